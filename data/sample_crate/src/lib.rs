//! Core building blocks of a payments service: money arithmetic, a double-entry ledger,
//! fee schedules, the payment state machine and idempotent request handling.
//!
//! Everything works in integer minor units (cents); floating point never touches an amount.

pub mod currency;
pub mod fees;
pub mod idempotency;
pub mod ledger;
pub mod money;
pub mod payment;

pub use currency::Currency;
pub use money::{Money, MoneyError};
pub use payment::{Payment, PaymentError, PaymentStatus};
