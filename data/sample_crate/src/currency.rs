//! ISO 4217 currencies and their minor-unit exponents.

use std::fmt;
use std::str::FromStr;

/// A supported ISO 4217 currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Currency {
    Eur,
    Usd,
    Gbp,
    Jpy,
    Kwd,
}

impl Currency {
    /// Number of digits after the decimal point in the currency's minor unit.
    ///
    /// JPY has no minor unit; KWD has three (fils).
    pub const fn exponent(self) -> u32 {
        match self {
            Currency::Jpy => 0,
            Currency::Kwd => 3,
            Currency::Eur | Currency::Usd | Currency::Gbp => 2,
        }
    }

    /// The three-letter ISO code.
    pub const fn code(self) -> &'static str {
        match self {
            Currency::Eur => "EUR",
            Currency::Usd => "USD",
            Currency::Gbp => "GBP",
            Currency::Jpy => "JPY",
            Currency::Kwd => "KWD",
        }
    }

    /// Minor units in one major unit (100 for EUR, 1 for JPY, 1000 for KWD).
    pub const fn minor_per_major(self) -> i64 {
        10_i64.pow(self.exponent())
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// Error returned when a currency code is not supported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownCurrency(pub String);

impl FromStr for Currency {
    type Err = UnknownCurrency;

    fn from_str(code: &str) -> Result<Self, Self::Err> {
        match code.to_ascii_uppercase().as_str() {
            "EUR" => Ok(Currency::Eur),
            "USD" => Ok(Currency::Usd),
            "GBP" => Ok(Currency::Gbp),
            "JPY" => Ok(Currency::Jpy),
            "KWD" => Ok(Currency::Kwd),
            _ => Err(UnknownCurrency(code.to_string())),
        }
    }
}
