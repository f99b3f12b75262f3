//! The QKD link's protocol core, free of any transport: no network IO, no async runtime, no
//! database, no clock (times are arguments), randomness injected.
//!
//! * [`quantum`]: Alice's time-bin states and bases, her per-frame secret and the state of each
//!   pulse, and Bob's detections (what a source and a receiver, simulated or real, exchange with
//!   the protocol).
//! * [`postproc`]: pure post-processing stages (Cascade, LDPC, verification hash, Toeplitz
//!   privacy amplification, finite-key length).
//! * [`sifting`]: the sifting and parameter-estimation rules both sides apply to a frame.
//! * [`link`]: the post-processing protocol as state machines (Alice answers, Bob drives), used
//!   over gRPC by the daemons and in memory by the planning tool and tests.
//! * [`store`]: the [`store::KeyStore`] trait the link commits keys through, and an in-memory
//!   [`store::MemoryStore`].
//! * [`auth`]: Wegman-Carter authentication of each block's transcript and the authentication
//!   key pool ([`auth::AuthPool`], [`auth::MemoryAuthPool`]).
//! * [`bits`], [`wire`]: packed bit strings and the varint encodings of the wire messages.

pub mod auth;
pub mod bits;
pub mod link;
pub mod postproc;
pub mod prepared;
pub mod quantum;
pub mod sifting;
pub mod store;
pub mod wire;

/// Runs a future to completion on this thread, without an async runtime: the driver for links
/// whose peer never waits (the in-memory [`link::memory::MemoryAlice`] of the planning tool and
/// the tests). A future that did wait would be woken by unparking this thread.
pub fn block_on<F: Future>(future: F) -> F::Output {
    use std::sync::Arc;
    use std::task::{Context, Poll, Wake, Waker};

    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        match future.as_mut().poll(&mut cx) {
            Poll::Ready(out) => return out,
            Poll::Pending => std::thread::park(),
        }
    }
}
