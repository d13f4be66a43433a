//! Amounts of money in integer minor units, with checked arithmetic.

use std::fmt;

use crate::currency::Currency;

/// An amount in the minor units of one currency (cents for EUR, yen for JPY).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Money {
    minor: i64,
    currency: Currency,
}

/// Why an operation on money failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MoneyError {
    /// The two amounts are in different currencies.
    CurrencyMismatch { left: Currency, right: Currency },
    /// The result does not fit in an i64 of minor units.
    Overflow,
    /// Allocation weights were empty or summed to zero.
    InvalidWeights,
}

impl Money {
    /// Creates an amount from minor units.
    pub const fn from_minor(minor: i64, currency: Currency) -> Self {
        Money { minor, currency }
    }

    /// Creates an amount from whole major units, e.g. `Money::from_major(12, Currency::Eur)` is 12.00 EUR.
    pub fn from_major(major: i64, currency: Currency) -> Result<Self, MoneyError> {
        major
            .checked_mul(currency.minor_per_major())
            .map(|minor| Money { minor, currency })
            .ok_or(MoneyError::Overflow)
    }

    /// The zero amount of a currency.
    pub const fn zero(currency: Currency) -> Self {
        Money { minor: 0, currency }
    }

    pub const fn minor(&self) -> i64 {
        self.minor
    }

    pub const fn currency(&self) -> Currency {
        self.currency
    }

    pub const fn is_negative(&self) -> bool {
        self.minor < 0
    }

    /// Adds two amounts of the same currency.
    pub fn checked_add(self, other: Money) -> Result<Money, MoneyError> {
        self.same_currency(other)?;
        self.minor
            .checked_add(other.minor)
            .map(|minor| Money { minor, ..self })
            .ok_or(MoneyError::Overflow)
    }

    /// Subtracts `other` from `self`; the result may be negative (a refund larger than a capture).
    pub fn checked_sub(self, other: Money) -> Result<Money, MoneyError> {
        self.same_currency(other)?;
        self.minor
            .checked_sub(other.minor)
            .map(|minor| Money { minor, ..self })
            .ok_or(MoneyError::Overflow)
    }

    /// Splits the amount by integer weights without losing a cent: the remainder left by
    /// rounding down goes, one minor unit at a time, to the first shares.
    pub fn allocate(self, weights: &[u32]) -> Result<Vec<Money>, MoneyError> {
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        if total == 0 {
            return Err(MoneyError::InvalidWeights);
        }
        let mut shares: Vec<Money> = weights
            .iter()
            .map(|&w| {
                let minor = (i128::from(self.minor) * i128::from(w) / i128::from(total)) as i64;
                Money { minor, ..self }
            })
            .collect();
        let allocated: i64 = shares.iter().map(|m| m.minor).sum();
        let step = if self.minor >= 0 { 1 } else { -1 };
        let mut remainder = self.minor - allocated;
        for share in shares.iter_mut() {
            if remainder == 0 {
                break;
            }
            share.minor += step;
            remainder -= step;
        }
        Ok(shares)
    }

    fn same_currency(&self, other: Money) -> Result<(), MoneyError> {
        if self.currency == other.currency {
            Ok(())
        } else {
            Err(MoneyError::CurrencyMismatch { left: self.currency, right: other.currency })
        }
    }
}

impl fmt::Display for Money {
    /// Formats as `12.34 EUR`, `1200 JPY` or `-0.050 KWD`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let exponent = self.currency.exponent() as usize;
        let sign = if self.minor < 0 { "-" } else { "" };
        let abs = self.minor.unsigned_abs();
        if exponent == 0 {
            return write!(f, "{sign}{abs} {}", self.currency);
        }
        let per_major = self.currency.minor_per_major() as u64;
        write!(f, "{sign}{}.{:0width$} {}", abs / per_major, abs % per_major, self.currency, width = exponent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_never_loses_a_cent() {
        let total = Money::from_minor(100, Currency::Eur);
        let shares = total.allocate(&[1, 1, 1]).unwrap();
        let minors: Vec<i64> = shares.iter().map(Money::minor).collect();
        assert_eq!(minors, vec![34, 33, 33]);
    }

    #[test]
    fn display_uses_the_currency_exponent() {
        assert_eq!(Money::from_minor(1234, Currency::Eur).to_string(), "12.34 EUR");
        assert_eq!(Money::from_minor(1200, Currency::Jpy).to_string(), "1200 JPY");
        assert_eq!(Money::from_minor(-50, Currency::Kwd).to_string(), "-0.050 KWD");
    }

    #[test]
    fn mixing_currencies_is_an_error() {
        let eur = Money::from_minor(1, Currency::Eur);
        let usd = Money::from_minor(1, Currency::Usd);
        assert!(matches!(eur.checked_add(usd), Err(MoneyError::CurrencyMismatch { .. })));
    }
}
