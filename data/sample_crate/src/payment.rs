//! The payment life cycle as a state machine: authorize, capture (partially or fully), refund, void.

use crate::money::{Money, MoneyError};

/// Where a payment is in its life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentStatus {
    Created,
    Authorized,
    PartiallyCaptured,
    Captured,
    PartiallyRefunded,
    Refunded,
    Voided,
    Failed,
}

/// Why a transition was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PaymentError {
    /// The operation is not allowed in the current status.
    InvalidTransition { from: PaymentStatus, operation: &'static str },
    /// Capturing or refunding more than is available.
    AmountTooLarge { requested: Money, available: Money },
    Money(MoneyError),
}

impl From<MoneyError> for PaymentError {
    fn from(err: MoneyError) -> Self {
        PaymentError::Money(err)
    }
}

/// A card payment with its authorized, captured and refunded totals.
#[derive(Debug, Clone)]
pub struct Payment {
    pub id: String,
    pub status: PaymentStatus,
    authorized: Money,
    captured: Money,
    refunded: Money,
}

impl Payment {
    pub fn new(id: impl Into<String>, amount: Money) -> Self {
        let zero = Money::zero(amount.currency());
        Payment { id: id.into(), status: PaymentStatus::Created, authorized: amount, captured: zero, refunded: zero }
    }

    /// Marks the payment authorized once the issuer approved the amount.
    pub fn authorize(&mut self) -> Result<(), PaymentError> {
        self.expect(&[PaymentStatus::Created], "authorize")?;
        self.status = PaymentStatus::Authorized;
        Ok(())
    }

    /// Captures part or all of the remaining authorized amount.
    pub fn capture(&mut self, amount: Money) -> Result<(), PaymentError> {
        self.expect(&[PaymentStatus::Authorized, PaymentStatus::PartiallyCaptured], "capture")?;
        let available = self.authorized.checked_sub(self.captured)?;
        if amount.minor() > available.minor() {
            return Err(PaymentError::AmountTooLarge { requested: amount, available });
        }
        self.captured = self.captured.checked_add(amount)?;
        self.status = if self.captured == self.authorized {
            PaymentStatus::Captured
        } else {
            PaymentStatus::PartiallyCaptured
        };
        Ok(())
    }

    /// Refunds part or all of the captured amount.
    pub fn refund(&mut self, amount: Money) -> Result<(), PaymentError> {
        self.expect(
            &[PaymentStatus::Captured, PaymentStatus::PartiallyCaptured, PaymentStatus::PartiallyRefunded],
            "refund",
        )?;
        let available = self.captured.checked_sub(self.refunded)?;
        if amount.minor() > available.minor() {
            return Err(PaymentError::AmountTooLarge { requested: amount, available });
        }
        self.refunded = self.refunded.checked_add(amount)?;
        self.status = if self.refunded == self.captured {
            PaymentStatus::Refunded
        } else {
            PaymentStatus::PartiallyRefunded
        };
        Ok(())
    }

    /// Releases an authorization that was never captured.
    pub fn void(&mut self) -> Result<(), PaymentError> {
        self.expect(&[PaymentStatus::Authorized], "void")?;
        self.status = PaymentStatus::Voided;
        Ok(())
    }

    pub fn captured(&self) -> Money {
        self.captured
    }

    pub fn refunded(&self) -> Money {
        self.refunded
    }

    fn expect(&self, allowed: &[PaymentStatus], operation: &'static str) -> Result<(), PaymentError> {
        if allowed.contains(&self.status) {
            Ok(())
        } else {
            Err(PaymentError::InvalidTransition { from: self.status, operation })
        }
    }
}
