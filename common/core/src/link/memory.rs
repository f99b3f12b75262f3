//! Alice in the same process as Bob: the planning tool's and the tests' transport.

use std::sync::{Arc, Mutex, MutexGuard};

use super::LinkError;
use super::alice::{AliceCore, AliceEvent};
use super::bob::LinkPeer;
use super::request::{HandleContext, Request, Response};
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
    async fn call(&mut self, request: Request) -> Result<Response, LinkError> {
        let mut guard = self.lock();
        let alice = &mut *guard;
        let ctx = HandleContext { store: alice.store.as_ref(), now_unix_ms: alice.now_unix_ms };
        let (response, event) = alice.core.handle(request, &ctx)?;
        alice.events.extend(event);
        Ok(response)
    }
}
