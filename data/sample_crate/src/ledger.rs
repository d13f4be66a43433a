//! A double-entry ledger: every transaction moves money between accounts and balances to zero.

use std::collections::BTreeMap;

use crate::currency::Currency;
use crate::money::{Money, MoneyError};

/// Identifies a ledger account, e.g. `merchant:42:available`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AccountId(pub String);

/// One side of a transaction: a positive amount is a debit, a negative one a credit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Posting {
    pub account: AccountId,
    pub amount: Money,
}

/// Why a transaction was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LedgerError {
    /// Debits and credits do not cancel out.
    Unbalanced { currency: Currency, difference: i64 },
    /// A transaction needs at least two postings.
    TooFewPostings,
    Money(MoneyError),
}

impl From<MoneyError> for LedgerError {
    fn from(err: MoneyError) -> Self {
        LedgerError::Money(err)
    }
}

/// An in-memory ledger keeping one balance per account and currency.
#[derive(Debug, Default)]
pub struct Ledger {
    balances: BTreeMap<(AccountId, Currency), i64>,
    journal: Vec<Vec<Posting>>,
}

impl Ledger {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a transaction atomically: either every posting is applied or none is.
    pub fn record(&mut self, postings: Vec<Posting>) -> Result<usize, LedgerError> {
        if postings.len() < 2 {
            return Err(LedgerError::TooFewPostings);
        }
        let mut per_currency: BTreeMap<Currency, i64> = BTreeMap::new();
        for posting in &postings {
            let sum = per_currency.entry(posting.amount.currency()).or_insert(0);
            *sum = sum.checked_add(posting.amount.minor()).ok_or(MoneyError::Overflow)?;
        }
        if let Some((&currency, &difference)) = per_currency.iter().find(|(_, &sum)| sum != 0) {
            return Err(LedgerError::Unbalanced { currency, difference });
        }
        for posting in &postings {
            let key = (posting.account.clone(), posting.amount.currency());
            *self.balances.entry(key).or_insert(0) += posting.amount.minor();
        }
        self.journal.push(postings);
        Ok(self.journal.len() - 1)
    }

    /// The balance of an account in one currency (zero for an account never used).
    pub fn balance(&self, account: &AccountId, currency: Currency) -> Money {
        let minor = self.balances.get(&(account.clone(), currency)).copied().unwrap_or(0);
        Money::from_minor(minor, currency)
    }

    /// Number of recorded transactions.
    pub fn len(&self) -> usize {
        self.journal.len()
    }

    pub fn is_empty(&self) -> bool {
        self.journal.is_empty()
    }
}

/// Builds the two postings that move `amount` from `from` to `to`.
pub fn transfer(from: &AccountId, to: &AccountId, amount: Money) -> Vec<Posting> {
    let credit = Money::from_minor(-amount.minor(), amount.currency());
    vec![
        Posting { account: to.clone(), amount },
        Posting { account: from.clone(), amount: credit },
    ]
}
