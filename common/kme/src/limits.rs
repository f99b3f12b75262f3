//! What the ETSI server grants its callers, so that one SAE (or a flood of connections) cannot
//! starve the others: concurrent connections in all and per SAE, each SAE's request rate (a
//! token bucket), and how long a connection may stay idle.
//!
//! A caller over a limit gets the standard's Error body with 429 (its own connections or
//! requests are too many; `Retry-After` says when a request would be accepted) or 503 (the KME
//! as a whole has no connection to spare), held back for that time before it is answered (see
//! [`Refusal::answer_delay`]). Counts are kept per SAE listed in the configuration;
//! callers that name no listed SAE (refused with 401 anyway) share one count.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::identity::SaeId;

/// The limits, validated (see the `[kme]` fields of the same names).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AbuseLimits {
    /// Most TLS connections served at once; past it, a connection's requests get 503.
    pub max_connections: u32,
    /// Most connections of one SAE at once; past it, that connection's requests get 429.
    pub max_connections_per_sae: u32,
    /// Sustained requests per second of one SAE (the bucket's refill); 0: no rate limit.
    pub requests_per_second_per_sae: u32,
    /// Requests one SAE may make at once after a quiet time (the bucket's size).
    pub request_burst_per_sae: u32,
    /// A connection with no request for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for AbuseLimits {
    /// The `[kme]` defaults.
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_connections_per_sae: 64,
            requests_per_second_per_sae: 200,
            request_burst_per_sae: 400,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Sockets beyond `max_connections` that are still accepted, to answer their requests with 503
/// instead of leaving them in the listen backlog; past these, the server stops accepting until a
/// connection ends.
pub const REFUSAL_SOCKETS: u32 = 64;

/// `Retry-After` of a refused connection, seconds. Each refused connection costs the KME a TLS
/// handshake, so a client that opens more connections than it may is slowed down harder than
/// one over its request rate (which costs a request on an open connection).
pub const CONNECTION_RETRY_AFTER_S: u64 = 5;

/// Why a connection or a request is refused.
#[derive(Clone, Debug, PartialEq)]
pub enum Refusal {
    /// The KME serves `max_connections` connections already (503).
    KmeBusy {
        /// The limit.
        max_connections: u32,
    },
    /// The SAE has `max_connections_per_sae` connections open already (429).
    SaeConnections {
        /// The limit.
        max_connections_per_sae: u32,
    },
    /// The SAE's request rate is over its limit (429); a request is accepted again after
    /// `retry_after`.
    SaeRate {
        /// The limit, requests per second.
        requests_per_second: u32,
        /// Time until the bucket holds a token again.
        retry_after: Duration,
    },
}

/// Whose count a caller is kept in: a listed SAE, or the one count of every other caller.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Account {
    Sae(SaeId),
    Unlisted,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

#[derive(Default)]
struct Counts {
    open: u32,
    per_account: HashMap<Account, u32>,
    buckets: HashMap<Account, Bucket>,
}

/// The counts behind the limits, shared by the accept loop and every connection.
pub struct Admission {
    limits: AbuseLimits,
    listed: Box<dyn Fn(&SaeId) -> bool + Send + Sync>,
    counts: Mutex<Counts>,
}

/// A connection admitted: its place in the counts, given back when dropped.
pub struct ConnectionSlot {
    admission: Arc<Admission>,
    account: Account,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut counts = self.admission.lock();
        counts.open = counts.open.saturating_sub(1);
        if let Some(n) = counts.per_account.get_mut(&self.account) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.per_account.remove(&self.account);
            }
        }
    }
}

impl Admission {
    /// Counts for `limits`; `listed` says whether an SAE ID is in the configuration.
    pub fn new(limits: AbuseLimits, listed: impl Fn(&SaeId) -> bool + Send + Sync + 'static) -> Arc<Self> {
        Arc::new(Self { limits, listed: Box::new(listed), counts: Mutex::new(Counts::default()) })
    }

    /// The limits.
    pub fn limits(&self) -> AbuseLimits {
        self.limits
    }

    /// Connections admitted and open now.
    pub fn open_connections(&self) -> u32 {
        self.lock().open
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        // The counts stay consistent whatever panicked while holding them (each update is one
        // statement), so a poisoned lock is taken over.
        self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn account(&self, caller: Option<&SaeId>) -> Account {
        match caller {
            Some(sae) if (self.listed)(sae) => Account::Sae(sae.clone()),
            _ => Account::Unlisted,
        }
    }

    /// Admits a new connection of `caller` (the SAE of its certificate), or says why not.
    pub fn admit_connection(self: &Arc<Self>, caller: Option<&SaeId>) -> Result<ConnectionSlot, Refusal> {
        let account = self.account(caller);
        let mut counts = self.lock();
        // The caller's own limit first: a caller over it is told so (429) whatever the others do.
        let of_account = counts.per_account.get(&account).copied().unwrap_or(0);
        if of_account >= self.limits.max_connections_per_sae {
            return Err(Refusal::SaeConnections { max_connections_per_sae: self.limits.max_connections_per_sae });
        }
        if counts.open >= self.limits.max_connections {
            return Err(Refusal::KmeBusy { max_connections: self.limits.max_connections });
        }
        counts.open += 1;
        counts.per_account.insert(account.clone(), of_account + 1);
        drop(counts);
        Ok(ConnectionSlot { admission: self.clone(), account })
    }

    /// Takes one token of `caller`'s bucket at `now`, or says when one will be there.
    pub fn admit_request(&self, caller: Option<&SaeId>, now: Instant) -> Result<(), Refusal> {
        let rate = self.limits.requests_per_second_per_sae;
        if rate == 0 {
            return Ok(());
        }
        let account = self.account(caller);
        let burst = f64::from(self.limits.request_burst_per_sae.max(1));
        let mut counts = self.lock();
        let bucket = counts.buckets.entry(account).or_insert(Bucket { tokens: burst, at: now });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * f64::from(rate)).min(burst);
        bucket.at = bucket.at.max(now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let retry_after = Duration::from_secs_f64((1.0 - bucket.tokens) / f64::from(rate));
            Err(Refusal::SaeRate { requests_per_second: rate, retry_after })
        }
    }
}

impl Refusal {
    /// The HTTP status of the refusal: 503 when the KME is full, 429 when the caller is over its
    /// own limit.
    pub fn status(&self) -> axum::http::StatusCode {
        match self {
            Self::KmeBusy { .. } => axum::http::StatusCode::SERVICE_UNAVAILABLE,
            Self::SaeConnections { .. } | Self::SaeRate { .. } => axum::http::StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// Whole seconds a client should wait before trying again (`Retry-After`), at least 1.
    pub fn retry_after_s(&self) -> u64 {
        match self {
            Self::SaeRate { retry_after, .. } => retry_after.as_secs_f64().ceil().max(1.0) as u64,
            Self::KmeBusy { .. } | Self::SaeConnections { .. } => CONNECTION_RETRY_AFTER_S,
        }
    }

    /// How long the refusal is held before it is answered: its `Retry-After`. A client that
    /// retries at once, as a flood does, then makes one request per second per connection (or
    /// HTTP/2 stream) instead of as many as the KME can refuse, and the TLS handshakes and
    /// refusals it costs cannot take the CPU from the callers within their limits. A client that
    /// honours `Retry-After` waits for it once more.
    pub fn answer_delay(&self) -> Duration {
        Duration::from_secs(self.retry_after_s())
    }

    /// The Error body's message.
    pub fn message(&self) -> String {
        match self {
            Self::KmeBusy { max_connections } => {
                format!("this KME serves at most {max_connections} connections at once; try again later")
            }
            Self::SaeConnections { max_connections_per_sae } => format!(
                "this SAE has {max_connections_per_sae} connections open already, the most allowed \
                 (max_connections_per_sae); reuse one of them"
            ),
            Self::SaeRate { requests_per_second, .. } => format!(
                "this SAE is over its request rate ({requests_per_second} requests per second, \
                 requests_per_second_per_sae); try again after Retry-After"
            ),
        }
    }
}

impl axum::response::IntoResponse for Refusal {
    /// The status, `Retry-After`, and the standard's Error body.
    fn into_response(self) -> axum::response::Response {
        let body = super::api::ErrorBody { message: self.message(), details: None };
        (self.status(), [(axum::http::header::RETRY_AFTER, self.retry_after_s().to_string())], axum::Json(body))
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(limits: AbuseLimits) -> Arc<Admission> {
        Admission::new(limits, |sae: &SaeId| sae.0.starts_with("sae-"))
    }

    #[test]
    fn connections_are_capped_per_sae_and_in_all_and_given_back_when_dropped() {
        let limits = AbuseLimits { max_connections: 5, max_connections_per_sae: 2, ..AbuseLimits::default() };
        let admission = admission(limits);
        let (a, b) = (SaeId("sae-a".into()), SaeId("sae-b".into()));
        let a1 = admission.admit_connection(Some(&a)).unwrap();
        let _a2 = admission.admit_connection(Some(&a)).unwrap();
        assert_eq!(
            admission.admit_connection(Some(&a)).err(),
            Some(Refusal::SaeConnections { max_connections_per_sae: 2 })
        );
        // Another SAE is not affected by a's count.
        let _b1 = admission.admit_connection(Some(&b)).unwrap();
        drop(a1);
        let _a3 = admission.admit_connection(Some(&a)).unwrap();
        // Unlisted callers (and callers without an SAE ID) share one count.
        let _u1 = admission.admit_connection(Some(&SaeId("mallory-1".into()))).unwrap();
        let _u2 = admission.admit_connection(None).unwrap();
        assert_eq!(admission.open_connections(), 5);
        assert_eq!(admission.admit_connection(Some(&b)).err(), Some(Refusal::KmeBusy { max_connections: 5 }));
        // A caller over its own limit is told so even when the KME is full.
        assert_eq!(
            admission.admit_connection(Some(&SaeId("mallory-2".into()))).err(),
            Some(Refusal::SaeConnections { max_connections_per_sae: 2 })
        );
        // With room in all again, the unlisted callers' one count (2 of 2) still refuses.
        drop(_a3);
        assert_eq!(admission.open_connections(), 4);
        assert_eq!(
            admission.admit_connection(Some(&SaeId("mallory-3".into()))).err(),
            Some(Refusal::SaeConnections { max_connections_per_sae: 2 }),
            "unlisted callers share one count"
        );
        let _a4 = admission.admit_connection(Some(&a)).unwrap();
    }

    #[test]
    fn the_request_rate_is_a_token_bucket_per_sae() {
        let limits =
            AbuseLimits { requests_per_second_per_sae: 10, request_burst_per_sae: 3, ..AbuseLimits::default() };
        let admission = admission(limits);
        let (a, b) = (SaeId("sae-a".into()), SaeId("sae-b".into()));
        let t0 = Instant::now();
        for _ in 0..3 {
            admission.admit_request(Some(&a), t0).unwrap();
        }
        let Err(Refusal::SaeRate { requests_per_second: 10, retry_after }) = admission.admit_request(Some(&a), t0)
        else {
            panic!("a fourth request at once must be refused");
        };
        // One token comes back every 100 ms.
        assert!((retry_after.as_secs_f64() - 0.1).abs() < 1e-9, "{retry_after:?}");
        assert!(admission.admit_request(Some(&a), t0 + Duration::from_millis(99)).is_err());
        admission.admit_request(Some(&a), t0 + Duration::from_millis(100)).unwrap();
        assert!(admission.admit_request(Some(&a), t0 + Duration::from_millis(100)).is_err());
        // b's bucket is its own.
        admission.admit_request(Some(&b), t0).unwrap();
        // After a long quiet time the bucket holds the burst again, no more.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            admission.admit_request(Some(&a), later).unwrap();
        }
        assert!(admission.admit_request(Some(&a), later).is_err());
        // A clock read out of order (two threads) never refills.
        assert!(admission.admit_request(Some(&a), t0).is_err());
    }

    #[test]
    fn a_zero_rate_is_no_limit() {
        let admission = admission(AbuseLimits { requests_per_second_per_sae: 0, ..AbuseLimits::default() });
        let now = Instant::now();
        for _ in 0..10_000 {
            admission.admit_request(Some(&SaeId("sae-a".into())), now).unwrap();
        }
    }

    #[test]
    fn refusals_answer_429_or_503_with_retry_after() {
        let rate = Refusal::SaeRate { requests_per_second: 5, retry_after: Duration::from_millis(1500) };
        assert_eq!(rate.status(), axum::http::StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(rate.retry_after_s(), 2);
        let tiny = Refusal::SaeRate { requests_per_second: 5, retry_after: Duration::from_millis(1) };
        assert_eq!(tiny.retry_after_s(), 1);
        assert_eq!(Refusal::KmeBusy { max_connections: 1 }.status(), axum::http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            Refusal::SaeConnections { max_connections_per_sae: 1 }.status(),
            axum::http::StatusCode::TOO_MANY_REQUESTS
        );
    }
}
