//! Test support shared by the core's link tests and `common`'s (which run the same protocol
//! with the simulator and sled stores): an in-memory Alice whose connection fails during a
//! commit. Not part of the API.

use super::LinkError;
use super::bob::LinkPeer;
use super::memory::MemoryAlice;
use super::request::{Request, Response};

/// Where a test makes the connection to Alice fail during a commit.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Crash {
    /// The connection never fails.
    None,
    /// Bob's commit request never reaches Alice.
    BeforeAliceCommits,
    /// Alice commits but her answer never reaches Bob.
    AfterAliceCommits,
}

/// A [`MemoryAlice`] behind a connection that fails as `crash` says.
pub struct FlakyAlice {
    /// The Alice behind the connection.
    pub alice: MemoryAlice,
    /// Where the connection fails.
    pub crash: Crash,
}

impl LinkPeer for FlakyAlice {
    async fn call(&mut self, request: Request) -> Result<Response, LinkError> {
        let lost = || LinkError::Transport("connection lost".into());
        match (&request, self.crash) {
            (Request::Commit(_), Crash::BeforeAliceCommits) => Err(lost()),
            (Request::Commit(_), Crash::AfterAliceCommits) => {
                self.alice.call(request).await?;
                Err(lost())
            }
            _ => self.alice.call(request).await,
        }
    }
}

/// Two in-memory authentication pools holding the same pre-shared secret (64 KiB drawn from
/// `seed`): Alice's and Bob's, for links run in one process (the tests, the planning tool).
pub fn auth_pools(
    seed: u64,
) -> (std::sync::Arc<crate::auth::MemoryAuthPool>, std::sync::Arc<crate::auth::MemoryAuthPool>) {
    use rand::{RngCore, SeedableRng};
    let mut secret = zeroize::Zeroizing::new(vec![0u8; 1 << 16]);
    rand_chacha::ChaCha20Rng::seed_from_u64(seed ^ 0x05EC_2E7A).fill_bytes(&mut secret);
    let pool = || std::sync::Arc::new(crate::auth::MemoryAuthPool::new(&secret));
    (pool(), pool())
}
