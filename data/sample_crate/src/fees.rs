//! Fee schedules: a percentage in basis points plus a fixed part, with a floor and a cap.

use crate::money::{Money, MoneyError};

/// One basis point is a hundredth of a percent.
pub const BASIS_POINTS_PER_UNIT: i64 = 10_000;

/// How a processor charges for a payment, e.g. 1.4% + 0.25 EUR, at least 0.30 EUR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeeSchedule {
    pub basis_points: u32,
    pub fixed: Money,
    pub minimum: Option<Money>,
    pub maximum: Option<Money>,
}

/// Rounding used for the percentage part; processors round half away from zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rounding {
    HalfAwayFromZero,
    Down,
}

impl FeeSchedule {
    /// The fee charged on `amount`, clamped to the minimum and maximum when they are set.
    pub fn fee_for(&self, amount: Money, rounding: Rounding) -> Result<Money, MoneyError> {
        let variable = percentage(amount.minor(), self.basis_points, rounding);
        let mut fee = Money::from_minor(variable, amount.currency()).checked_add(self.fixed)?;
        if let Some(minimum) = self.minimum {
            if fee.minor() < minimum.minor() {
                fee = minimum;
            }
        }
        if let Some(maximum) = self.maximum {
            if fee.minor() > maximum.minor() {
                fee = maximum;
            }
        }
        Ok(fee)
    }

    /// What the merchant receives after the fee.
    pub fn net_amount(&self, amount: Money, rounding: Rounding) -> Result<Money, MoneyError> {
        amount.checked_sub(self.fee_for(amount, rounding)?)
    }
}

/// `minor * basis_points / 10_000`, computed in i128 so large amounts cannot overflow.
fn percentage(minor: i64, basis_points: u32, rounding: Rounding) -> i64 {
    let product = i128::from(minor) * i128::from(basis_points);
    let divisor = i128::from(BASIS_POINTS_PER_UNIT);
    let result = match rounding {
        Rounding::Down => product / divisor,
        Rounding::HalfAwayFromZero => {
            let half = divisor / 2;
            if product >= 0 { (product + half) / divisor } else { (product - half) / divisor }
        }
    };
    result as i64
}
