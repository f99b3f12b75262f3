//! Alice in the same process as Bob: the planning tool's and the tests' transport.

use std::sync::{Arc, Mutex, MutexGuard};

use proto::link::*;

use super::LinkError;
use super::alice::{AliceCore, AliceEvent};
use super::bob::LinkPeer;
use crate::store::KeyStore;

/// Alice's state when she runs in Bob's process.
pub struct MemoryAliceState {
    /// Alice's protocol state.
    pub core: AliceCore,
    /// Alice's key store.
    pub store: Arc<dyn KeyStore>,
    /// Time stamped on committed blocks, Unix milliseconds (simulated time in the planner).
    pub now_unix_ms: u64,
    /// What Alice reported, in order.
    pub events: Vec<AliceEvent>,
}

/// An [`AliceCore`] called directly; cloning gives another handle to the same Alice, so the
/// source (which registers frames) and Bob's link can both reach her.
#[derive(Clone)]
pub struct MemoryAlice {
    inner: Arc<Mutex<MemoryAliceState>>,
}

impl MemoryAlice {
    /// Wraps a core and a store.
    pub fn new(core: AliceCore, store: Arc<dyn KeyStore>) -> Self {
        Self { inner: Arc::new(Mutex::new(MemoryAliceState { core, store, now_unix_ms: 0, events: Vec::new() })) }
    }

    /// Locks Alice's state.
    pub fn lock(&self) -> MutexGuard<'_, MemoryAliceState> {
        // Invariant: nothing panics while holding this lock outside tests.
        self.inner.lock().expect("memory alice lock poisoned")
    }
}

impl LinkPeer for MemoryAlice {
    async fn hello(&mut self, req: HelloRequest) -> Result<HelloResponse, LinkError> {
        let mut a = self.lock();
        let store = a.store.clone();
        a.core.hello(&req, store.as_ref())
    }

    async fn sift(&mut self, req: SiftRequest) -> Result<SiftResponse, LinkError> {
        self.lock().core.sift(&req)
    }

    async fn start_block(&mut self, req: StartBlockRequest) -> Result<StartBlockResponse, LinkError> {
        let mut a = self.lock();
        let (resp, event) = a.core.start_block(&req)?;
        a.events.extend(event);
        Ok(resp)
    }

    async fn parities(&mut self, req: ParityRequest) -> Result<ParityResponse, LinkError> {
        self.lock().core.parities(&req)
    }

    async fn syndromes(&mut self, req: SyndromeRequest) -> Result<SyndromeResponse, LinkError> {
        self.lock().core.syndromes(&req)
    }

    async fn reveal(&mut self, req: RevealRequest) -> Result<RevealResponse, LinkError> {
        self.lock().core.reveal(&req)
    }

    async fn verify(&mut self, req: VerifyRequest) -> Result<VerifyResponse, LinkError> {
        self.lock().core.verify(&req)
    }

    async fn amplify(&mut self, req: AmplifyRequest) -> Result<AmplifyResponse, LinkError> {
        let mut a = self.lock();
        let now = a.now_unix_ms;
        let (resp, event) = a.core.amplify(&req, now)?;
        a.events.extend(event);
        Ok(resp)
    }

    async fn commit(&mut self, req: CommitRequest) -> Result<CommitResponse, LinkError> {
        let mut a = self.lock();
        let store = a.store.clone();
        let (resp, event) = a.core.commit(&req, store.as_ref())?;
        a.events.push(event);
        Ok(resp)
    }

    async fn abort(&mut self, req: AbortRequest) -> Result<AbortResponse, LinkError> {
        let mut a = self.lock();
        let (resp, event) = a.core.abort(&req)?;
        a.events.push(event);
        Ok(resp)
    }
}
