//! Idempotency keys: a retried request returns the first response instead of charging twice.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// What is remembered for one idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    /// Hash of the request body, so a key reused with a different body is rejected.
    pub request_hash: u64,
    pub status_code: u16,
    pub body: String,
}

/// Outcome of looking up a key before handling a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup<'a> {
    /// First time this key is seen: handle the request, then call `complete`.
    New,
    /// Same key and same body: replay the stored response.
    Replay(&'a StoredResponse),
    /// Same key, different body: the client has a bug; answer 422.
    Conflict,
}

/// An in-memory store that forgets keys after `ttl`.
pub struct IdempotencyStore {
    ttl: Duration,
    entries: HashMap<String, (Instant, StoredResponse)>,
}

impl IdempotencyStore {
    pub fn new(ttl: Duration) -> Self {
        IdempotencyStore { ttl, entries: HashMap::new() }
    }

    /// Looks up `key`, dropping it first if it has expired.
    pub fn lookup(&mut self, key: &str, request_hash: u64, now: Instant) -> Lookup<'_> {
        let expired = matches!(self.entries.get(key), Some((at, _)) if now.duration_since(*at) > self.ttl);
        if expired {
            self.entries.remove(key);
        }
        match self.entries.get(key) {
            None => Lookup::New,
            Some((_, stored)) if stored.request_hash == request_hash => Lookup::Replay(stored),
            Some(_) => Lookup::Conflict,
        }
    }

    /// Stores the response of a request handled for the first time.
    pub fn complete(&mut self, key: String, response: StoredResponse, now: Instant) {
        self.entries.insert(key, (now, response));
    }
}
