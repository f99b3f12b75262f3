//! Issue 14: the Wegman-Carter authentication of the classical channel against a man in the
//! middle who holds valid TLS certificates for both nodes (the lab's CA minted them: he plays
//! Alice to Bob and Bob to Alice, as a thief of both node keys would), and the authentication
//! pool's exhaustion and refill by a new pre-shared secret, all through the real daemons.

use std::sync::{Arc, Mutex};

use common::auth_pool::{LogEvent, SecretFile, install_secret, read_log};
use proto::link::link_client::LinkClient;
use proto::link::link_server::{Link, LinkServer};
use proto::link::*;
use qkd_core::store::KeyStore;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Way {
    Request,
    Response,
}

/// What the man in the middle does.
#[derive(Clone, Debug)]
enum Fault {
    /// One flipped bit in the next message `name` going `way`: the first bit, from `fraction`
    /// of the encoded message on, whose flip still decodes to a different message.
    Flip(&'static str, Way, f64),
    /// Alice's tag altered in every Amplify answer, until disarmed.
    EveryAliceTag,
    /// The next Commit carries Bob's tag of an earlier committed block (a replay).
    ReplayBobTag,
}

#[derive(Default)]
struct State {
    fault: Option<Fault>,
    /// Times the armed fault altered a message.
    fired: usize,
    /// Alice's IDs of the blocks a fault altered.
    tampered: Vec<String>,
    /// A Sift altered: the next block is the tampered one.
    sift_tampered: bool,
    /// Alice's ID of the block in progress.
    block: Option<String>,
    /// Bob's tag of the last block Alice committed.
    last_bob_tag: Option<Vec<u8>>,
}

#[derive(Clone)]
struct Mitm {
    alice: LinkClient<Channel>,
    state: Arc<Mutex<State>>,
}

/// One bit of `message` flipped (see [`Fault::Flip`]), or `None` if no flip decodes.
fn flip<M: prost::Message + Default + PartialEq>(message: &M, fraction: f64) -> Option<M> {
    let bytes = message.encode_to_vec();
    let n = bytes.len() * 8;
    let start = ((n.max(1) - 1) as f64 * fraction) as usize;
    (0..n).map(|k| (start + k) % n).find_map(|bit| {
        let mut altered = bytes.clone();
        altered[bit / 8] ^= 1 << (bit % 8);
        M::decode(altered.as_slice()).ok().filter(|m| m != message)
    })
}

impl Mitm {
    fn tamper<M: prost::Message + Default + PartialEq>(&self, name: &str, way: Way, message: M) -> M {
        let mut state = self.state.lock().unwrap();
        let altered = match &state.fault {
            Some(Fault::Flip(n, w, fraction)) if *n == name && *w == way => flip(&message, *fraction),
            _ => None,
        };
        let Some(altered) = altered else { return message };
        state.fault = None;
        state.fired += 1;
        if name == "Sift" {
            state.sift_tampered = true;
        } else if let Some(block) = state.block.clone() {
            state.tampered.push(block);
        }
        altered
    }
}

macro_rules! forward {
    ($self:ident, $request:ident, $name:literal, $method:ident) => {{
        let request = $self.tamper($name, Way::Request, $request.into_inner());
        let response = $self.alice.clone().$method(request).await?.into_inner();
        Ok(Response::new($self.tamper($name, Way::Response, response)))
    }};
}

#[tonic::async_trait]
impl Link for Mitm {
    async fn hello(&self, request: Request<HelloRequest>) -> Result<Response<HelloResponse>, Status> {
        // A new session drops the sifted bits of the old one.
        self.state.lock().unwrap().sift_tampered = false;
        forward!(self, request, "Hello", hello)
    }
    async fn sift(&self, request: Request<SiftRequest>) -> Result<Response<SiftResponse>, Status> {
        forward!(self, request, "Sift", sift)
    }
    async fn start_block(&self, request: Request<StartBlockRequest>) -> Result<Response<StartBlockResponse>, Status> {
        let request = self.tamper("StartBlock", Way::Request, request.into_inner());
        let response = self.alice.clone().start_block(request).await?.into_inner();
        {
            let mut state = self.state.lock().unwrap();
            state.block = Some(response.block_id.clone());
            if std::mem::take(&mut state.sift_tampered) {
                state.tampered.push(response.block_id.clone());
            }
        }
        Ok(Response::new(self.tamper("StartBlock", Way::Response, response)))
    }
    async fn parities(&self, request: Request<ParityRequest>) -> Result<Response<ParityResponse>, Status> {
        forward!(self, request, "Parities", parities)
    }
    async fn syndromes(&self, request: Request<SyndromeRequest>) -> Result<Response<SyndromeResponse>, Status> {
        forward!(self, request, "Syndromes", syndromes)
    }
    async fn reveal(&self, request: Request<RevealRequest>) -> Result<Response<RevealResponse>, Status> {
        forward!(self, request, "Reveal", reveal)
    }
    async fn verify(&self, request: Request<VerifyRequest>) -> Result<Response<VerifyResponse>, Status> {
        forward!(self, request, "Verify", verify)
    }
    async fn amplify(&self, request: Request<AmplifyRequest>) -> Result<Response<AmplifyResponse>, Status> {
        let request = self.tamper("Amplify", Way::Request, request.into_inner());
        let mut response = self.alice.clone().amplify(request).await?.into_inner();
        let mut state = self.state.lock().unwrap();
        if matches!(state.fault, Some(Fault::EveryAliceTag)) && response.alice_tag.len() == 16 {
            response.alice_tag[15] ^= 1;
            state.fired += 1;
            if let Some(block) = state.block.clone() {
                state.tampered.push(block);
            }
        }
        drop(state);
        Ok(Response::new(self.tamper("Amplify", Way::Response, response)))
    }
    async fn commit(&self, request: Request<CommitRequest>) -> Result<Response<CommitResponse>, Status> {
        let mut request = self.tamper("Commit", Way::Request, request.into_inner());
        {
            let mut state = self.state.lock().unwrap();
            if matches!(state.fault, Some(Fault::ReplayBobTag))
                && let Some(old) = state.last_bob_tag.clone()
            {
                request.bob_tag = old;
                state.fault = None;
                state.fired += 1;
                if let Some(block) = state.block.clone() {
                    state.tampered.push(block);
                }
            }
        }
        let tag = request.bob_tag.clone();
        let response = self.alice.clone().commit(request).await?.into_inner();
        if response.ready {
            self.state.lock().unwrap().last_bob_tag = Some(tag);
        }
        Ok(Response::new(self.tamper("Commit", Way::Response, response)))
    }
    async fn abort(&self, request: Request<AbortRequest>) -> Result<Response<AbortResponse>, Status> {
        forward!(self, request, "Abort", abort)
    }
}

/// Bob's failed blocks (aborted, or ending his session on an error) and reasons (his last
/// block's and his last session's error), Alice's aborted blocks and her last reason.
fn outcomes(lab: &Lab) -> (u64, String, u64, String) {
    let (bob, alice) = (lab.status("bob").unwrap_or_default(), lab.status("alice").unwrap_or_default());
    let bob_reason = format!("{} {}", bob["last_block"]["abort_reason"], bob["last_session_error"]);
    (
        counter(&bob, "/total/blocks_aborted") + counter(&bob, "/sessions_failed"),
        bob_reason,
        counter(&alice, "/blocks_aborted"),
        alice["last_abort_reason"].as_str().unwrap_or_default().to_owned(),
    )
}

/// Checks a pool's log: no two pads overlap, and no pad overlaps a hash key.
pub(crate) fn assert_no_pad_reuse(dir: &std::path::Path, end: &str) -> usize {
    let log = read_log(dir).unwrap();
    let mut pads: Vec<(u64, u64)> = log
        .iter()
        .filter_map(|e| if let LogEvent::Pad { offset, bits } = e { Some((*offset, *bits)) } else { None })
        .collect();
    pads.sort_unstable();
    for w in pads.windows(2) {
        assert!(w[0].0 + w[0].1 <= w[1].0, "{end}: pads {:?} and {:?} overlap", w[0], w[1]);
    }
    for event in &log {
        if let LogEvent::HashKey { offset } = event {
            for &(pad, bits) in &pads {
                assert!(
                    offset + 128 <= pad || *offset >= pad + bits,
                    "{end}: hash key {offset} overlaps pad {pad}+{bits}"
                );
            }
        }
    }
    pads.len()
}

/// Acceptance 1 and 3 of issue 14. A man in the middle with valid certificates for both nodes
/// flips one bit in messages of either direction, then replays Bob's tag of an earlier block:
/// each altered block aborts at both ends (with the authentication reason where the tags are
/// what catches it) and stores nothing. Then he alters every tag until the pool, which only
/// committed blocks refill, runs dry: distillation stops with an alarm at both ends, and a new
/// secret installed at both nodes while the daemons run resumes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_man_in_the_middle_with_valid_certificates_stores_no_key_and_an_exhausted_pool_resumes_with_a_new_secret() {
    let lab = Lab::new("mitm");
    // A small pre-shared secret at both nodes: 1024 bits.
    let secret = SecretFile::generate(128);
    for node in ["alice", "bob"] {
        install_secret(&lab.dir.0.join(node), &secret, false).unwrap();
    }
    let (grpc, fibre) = bind_pair().await;
    let (grpc_addr, fibre_addr) = (grpc.local_addr().unwrap(), fibre.local_addr().unwrap());
    let alice = spawn_alice(&lab, grpc, fibre);

    // The man in the middle: Alice's certificate towards Bob, Bob's towards Alice.
    let as_alice = lab.pki.files("alice").load().unwrap();
    let as_bob = lab.pki.files("bob").load().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mitm_addr = listener.local_addr().unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc_addr}"))
        .unwrap()
        .connect_with_connector_lazy(as_bob.grpc_connector("alice").unwrap());
    let state = Arc::new(Mutex::new(State::default()));
    let mitm = Mitm { alice: LinkClient::new(channel), state: state.clone() };
    let incoming = as_alice.grpc_incoming(listener, "man in the middle").unwrap();
    let mitm_stop = tokio_util::sync::CancellationToken::new();
    let mitm_task = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(LinkServer::new(mitm))
            .serve_with_incoming_shutdown(incoming, mitm_stop.clone().cancelled_owned()),
    );
    let bob = spawn_bob(&lab, mitm_addr, fibre_addr);
    let committed = |lab: &Lab| lab.status("bob").map_or(0, |s| counter(&s, "/total/blocks_committed"));
    wait_for("a block committed through the man in the middle", Duration::from_secs(120), || {
        (committed(&lab) >= 1).then_some(())
    })
    .await;

    // One altered message at a time. `tags_only`: nothing but the tags can notice it, so both
    // ends must name the failed authentication.
    let cases = [
        (Fault::Flip("Amplify", Way::Response, 1.0), true),
        (Fault::Flip("Commit", Way::Request, 1.0), true),
        (Fault::Flip("StartBlock", Way::Response, 0.6), false),
        (Fault::Flip("Parities", Way::Response, 0.5), false),
        (Fault::Flip("Parities", Way::Request, 0.3), false),
        (Fault::Flip("Sift", Way::Response, 0.5), false),
        (Fault::Flip("Sift", Way::Request, 0.5), false),
        (Fault::ReplayBobTag, true),
    ];
    for (fault, tags_only) in cases {
        let before = outcomes(&lab);
        let fired = {
            let mut s = state.lock().unwrap();
            s.fault = Some(fault.clone());
            s.fired
        };
        wait_for(&format!("{fault:?} to fire"), Duration::from_secs(60), || {
            (state.lock().unwrap().fired > fired).then_some(())
        })
        .await;
        // Bob's block failed (aborted, or his session ended on a refusal); where the tags caught
        // it, Alice counts it aborted too (on her own check or on Bob's abort).
        let after = wait_for(&format!("{fault:?}: the block failed"), Duration::from_secs(60), || {
            let now = outcomes(&lab);
            (now.0 > before.0 && (!tags_only || now.2 > before.2)).then_some(now)
        })
        .await;
        if tags_only {
            assert!(after.3.contains("authentication failed"), "{fault:?}: Alice: {}", after.3);
            assert!(after.1.contains("authentication failed"), "{fault:?}: Bob: {}", after.1);
        }
        let committed_now = committed(&lab);
        wait_for(&format!("{fault:?}: the link committing again"), Duration::from_secs(120), || {
            (committed(&lab) > committed_now).then_some(())
        })
        .await;
    }

    // Every Alice's tag altered: each failed block spends pad bits (and a fresh hash key) and
    // refills nothing, until the pool cannot pay for a block.
    state.lock().unwrap().fault = Some(Fault::EveryAliceTag);
    let alarm = |node: &str| lab.status(node).and_then(|s| s["auth_alarm"].as_str().map(str::to_owned));
    let (alice_alarm, bob_alarm) = wait_for("the authentication alarm at both ends", Duration::from_secs(300), || {
        alarm("alice").zip(alarm("bob"))
    })
    .await;
    assert!(alice_alarm.contains("authentication key pool exhausted"), "{alice_alarm}");
    assert!(bob_alarm.contains("a new pre-shared secret"), "{bob_alarm}");
    state.lock().unwrap().fault = None;
    // Nothing commits while the pool is dry: more blocks are refused for the same reason.
    let aborted = outcomes(&lab).0;
    let stuck_at = committed(&lab);
    wait_for("more blocks refused for the dry pool", Duration::from_secs(60), || {
        (outcomes(&lab).0 >= aborted + 2).then_some(())
    })
    .await;
    assert_eq!(committed(&lab), stuck_at);
    assert!(alarm("bob").is_some() && alarm("alice").is_some());

    // The operator installs a new secret at both nodes while the daemons run.
    let more = SecretFile::generate(64);
    for node in ["alice", "bob"] {
        assert_eq!(install_secret(&lab.dir.0.join(node), &more, false).unwrap(), common::auth_pool::Installed::Staged);
    }
    wait_for("a block committed after the new secret", Duration::from_secs(120), || {
        (committed(&lab) > stuck_at).then_some(())
    })
    .await;
    wait_for("the alarm cleared at both ends", Duration::from_secs(10), || {
        (alarm("alice").is_none() && alarm("bob").is_none()).then_some(())
    })
    .await;

    bob.stop().await.unwrap();
    alice.stop().await.unwrap();
    mitm_stop.cancel();
    mitm_task.await.unwrap().unwrap();

    // No altered block left a key at either end, and the stores agree.
    let tampered = state.lock().unwrap().tampered.clone();
    assert!(tampered.len() >= 8, "{tampered:?}");
    for node in ["alice", "bob"] {
        let store = qkd_store::SledStore::open(&lab.dir.0.join(node).join("store"), &lab.kek(node)).unwrap();
        for block in &tampered {
            let id = uuid::Uuid::parse_str(block).unwrap();
            assert_eq!(store.block_state(id).unwrap(), None, "{node} stored the altered block {block}");
        }
    }
    let (a, b) = (lab.summary("alice"), lab.summary("bob"));
    assert_eq!(a.digest, b.digest, "the two stores differ");
    // No pad bit was used twice at either end, and the new secret was applied at both.
    for node in ["alice", "bob"] {
        let dir = lab.dir.0.join(node).join("auth");
        assert!(assert_no_pad_reuse(&dir, node) >= 10);
        let log = read_log(&dir).unwrap();
        assert!(log.iter().any(|e| matches!(e, LogEvent::Secret { id, .. } if *id == more.id)), "{node}");
    }
}
