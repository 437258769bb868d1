//! Peers over loopback: `/skein/infer/1` streams direct, over TCP only, through a relay and
//! then hole-punched; a peer that is not the one named is refused.

use skein_peer::codec::{read_frame, write_frame};
use skein_peer::{
    infer::Inbound, Keypair, Multiaddr, Path, Peer, PeerConfig, PeerError, PeerId, RelayLimits,
};
use skein_proto::{ErrorCode, InferResponse, WireError};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::mpsc;

const MAX: u32 = 1 << 20;
const T: Duration = Duration::from_secs(20);

fn quic() -> Vec<Multiaddr> {
    vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()]
}

fn tcp() -> Vec<Multiaddr> {
    vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()]
}

fn key(seed: u8) -> Keypair {
    Keypair::ed25519_from_bytes([seed; 32]).unwrap()
}

async fn start(seed: u8, f: impl FnOnce(&mut PeerConfig)) -> (Peer, mpsc::Receiver<Inbound>) {
    // libp2p's and the peer layer's logs, with RUST_LOG.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut config = PeerConfig {
        listen: quic(),
        ..PeerConfig::default()
    };
    f(&mut config);
    Peer::start(key(seed), config).await.unwrap()
}

/// Answer every inbound stream: read the request frame, answer with its payload echoed in an
/// error message (any `skein/infer` frame will do).
fn serve(mut inbound: mpsc::Receiver<Inbound>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(Inbound { mut stream, .. }) = inbound.recv().await {
            tokio::spawn(async move {
                let Ok(frame) = read_frame(&mut stream, MAX).await else {
                    return;
                };
                let msg = String::from_utf8_lossy(frame.payload()).to_string();
                let answer = InferResponse::Err(WireError::new(ErrorCode::Malformed, msg));
                let _ = write_frame(&mut stream, &answer, &[b"ok"], MAX).await;
            });
        }
    })
}

async fn call(a: &Peer, b: PeerId, addrs: Vec<Multiaddr>, what: &str) -> Result<Path, PeerError> {
    let (mut stream, path) = a.open(b, addrs, T).await?;
    let req = InferResponse::Err(WireError::new(ErrorCode::Malformed, "request"));
    write_frame(&mut stream, &req, &[what.as_bytes()], MAX)
        .await
        .unwrap();
    let frame = read_frame(&mut stream, MAX).await.unwrap();
    assert_eq!(frame.payload(), b"ok");
    match frame.header::<InferResponse>().unwrap() {
        InferResponse::Err(e) => assert_eq!(e.message, what),
        other => panic!("{other:?}"),
    }
    Ok(path)
}

fn with_p2p(addr: &Multiaddr, id: PeerId) -> Multiaddr {
    addr.clone().with(libp2p_p2p(id))
}

fn libp2p_p2p(id: PeerId) -> skein_peer::multiaddr::Protocol<'static> {
    skein_peer::multiaddr::Protocol::P2p(id)
}

/// A relay (key `seed`) with `limits`, and a serving peer (key `seed + 1`) holding a
/// reservation on it: the relay, the peer, the peer's circuit address, its server task.
async fn behind_a_relay(
    seed: u8,
    limits: RelayLimits,
) -> (Peer, Peer, Multiaddr, tokio::task::JoinHandle<()>) {
    let (relay, _) = start(seed, |c| c.relay_server = Some(limits)).await;
    let relay_addr = with_p2p(&relay.status().listen[0], relay.peer_id());
    let (b, b_in) = start(seed + 1, |c| c.relays = vec![relay_addr.clone()]).await;
    let server = serve(b_in);
    until("a reservation on the relay", T, || {
        !b.status().relayed.is_empty()
    })
    .await;
    let circuit = b.status().relayed[0].clone();
    (relay, b, circuit, server)
}

/// Poll `f` every 20 ms until it is true, for at most `within`.
async fn until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One behaviour carries both protocols: `/skein/artifact/1` streams go to their own bounded
/// queue (here never drained: after its bound they are reset), and `/skein/infer/1` calls on
/// the same connection are still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifact_streams_have_their_own_bounded_queue_beside_infer_ones() {
    let (a, _) = start(5, |_| {}).await;
    let (b, b_in) = start(6, |c| c.max_inbound_artifact_streams = 2).await;
    let _server = serve(b_in);
    let addrs = b.status().listen;
    let artifacts = b.take_artifact_inbound().expect("the artifact streams");
    assert!(b.take_artifact_inbound().is_none(), "taken once");
    // Four artifact streams, each with a request frame: two are queued, the rest reset.
    let mut open = Vec::new();
    for i in 0..4u8 {
        let (mut s, path) = a
            .open_protocol(
                b.peer_id(),
                addrs.clone(),
                skein_peer::artifact::PROTOCOL,
                T,
            )
            .await
            .unwrap();
        assert_eq!(path, Path::Direct);
        let req = InferResponse::Err(WireError::new(ErrorCode::Malformed, "chunk"));
        write_frame(&mut s, &req, &[&[i]], MAX).await.unwrap();
        open.push(s);
    }
    until("two artifact streams queued", T, || artifacts.len() == 2).await;
    // The infer protocol is unaffected, on the same connection.
    let path = call(&a, b.peer_id(), addrs.clone(), "infer beside artifacts")
        .await
        .unwrap();
    assert_eq!(path, Path::Direct);
    assert_eq!(a.paths(b.peer_id()).await, vec![Path::Direct]);
    assert_eq!(artifacts.len(), 2, "the queue stays at its bound");
    // The queued ones are artifact streams, readable by whoever serves them.
    let mut artifacts = artifacts;
    let mut got = Vec::new();
    for _ in 0..2 {
        let mut inb = artifacts.recv().await.unwrap();
        assert_eq!(inb.peer, a.peer_id());
        let frame = read_frame(&mut inb.stream, MAX).await.unwrap();
        got.push(frame.payload()[0]);
    }
    assert_eq!(got.len(), 2);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_goes_direct_over_quic_and_carries_infer_frames() {
    let (a, _) = start(1, |_| {}).await;
    let (b, b_in) = start(2, |_| {}).await;
    let _server = serve(b_in);
    let addrs = b.status().listen;
    assert!(!addrs.is_empty());
    for i in 0..3 {
        let path = call(&a, b.peer_id(), addrs.clone(), &format!("call {i}"))
            .await
            .unwrap();
        assert_eq!(path, Path::Direct);
    }
    // One connection, reused.
    assert_eq!(a.paths(b.peer_id()).await, vec![Path::Direct]);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_serves_where_there_is_no_udp() {
    let (a, _) = start(3, |c| c.listen = tcp()).await;
    let (b, b_in) = start(4, |c| c.listen = tcp()).await;
    let _server = serve(b_in);
    let addrs = b.status().listen;
    assert!(
        addrs.iter().all(|a| a.to_string().contains("/tcp/")),
        "{addrs:?}"
    );
    let path = call(&a, b.peer_id(), addrs, "over tcp").await.unwrap();
    assert_eq!(path, Path::Direct);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_is_not_the_one_named_is_refused() {
    let (a, _) = start(5, |_| {}).await;
    let (b, b_in) = start(6, |_| {}).await;
    let _server = serve(b_in);
    let named = key(7).public().to_peer_id();
    let e = call(&a, named, b.status().listen, "to a liar")
        .await
        .unwrap_err();
    match &e {
        PeerError::WrongPeer {
            expected, obtained, ..
        } => {
            assert_eq!(*expected, named);
            assert_eq!(*obtained, b.peer_id());
        }
        other => panic!("expected WrongPeer, got {other}"),
    }
    let text = e.to_string();
    assert!(
        text.contains("refused") && text.contains(&named.to_string()),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_call_goes_through_the_relay_and_later_calls_hole_punched() {
    let (_relay, b, circuit, _server) = behind_a_relay(8, RelayLimits::default()).await;
    let (a, _) = start(10, |_| {}).await;
    // Only the circuit address: the caller cannot reach b directly.
    let first = call(&a, b.peer_id(), vec![circuit.clone()], "first")
        .await
        .unwrap();
    assert_eq!(first, Path::Relayed);
    // DCUtR upgrades the connection; later calls take the direct one.
    let deadline = tokio::time::Instant::now() + T;
    loop {
        if a.paths(b.peer_id()).await.contains(&Path::HolePunched) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no hole punch within {T:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let later = call(&a, b.peer_id(), vec![circuit], "later").await.unwrap();
    assert_eq!(later, Path::HolePunched);
    assert!(a.metrics().hole_punch_attempts() + b.metrics().hole_punch_attempts() >= 1);
}

/// The relay's rate limits apply as configured: with circuits from one IP address limited to
/// two (then one an hour), two callers on loopback get a circuit to the node and the third is
/// refused at once, while the node's reservation and the first circuits are untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_refuses_circuits_over_its_configured_rate() {
    let limits = RelayLimits {
        circuit_rate_per_ip: skein_peer::Rate::new(2, Duration::from_secs(3600)),
        ..RelayLimits::default()
    };
    let (_relay, b, circuit, _server) = behind_a_relay(20, limits).await;
    for seed in [22, 23] {
        let (caller, _) = start(seed, |_| {}).await;
        let path = call(
            &caller,
            b.peer_id(),
            vec![circuit.clone()],
            "within the rate",
        )
        .await
        .unwrap();
        assert_eq!(path, Path::Relayed);
    }
    let (third, _) = start(24, |_| {}).await;
    let started = tokio::time::Instant::now();
    let refused = call(&third, b.peer_id(), vec![circuit], "over the rate").await;
    assert!(
        matches!(refused, Err(PeerError::Dial(..))),
        "a third circuit from the same IP: {refused:?}"
    );
    assert!(started.elapsed() < T, "refused at once, not timed out");
}

/// QUIC first, TCP as the fallback: with a QUIC address that never answers (a UDP socket
/// that reads nothing, as where UDP is dropped) and a live TCP one, the call connects over TCP
/// once the fallback is due (1.5 s), well before the QUIC handshake would time out (5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_address_that_never_answers_falls_back_to_tcp() {
    let (a, _) = start(11, |c| {
        c.listen = vec![quic()[0].clone(), tcp()[0].clone()];
    })
    .await;
    let (b, b_in) = start(12, |c| c.listen = tcp()).await;
    let _server = serve(b_in);
    let hole = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dead: Multiaddr = format!(
        "/ip4/127.0.0.1/udp/{}/quic-v1",
        hole.local_addr().unwrap().port()
    )
    .parse()
    .unwrap();
    let mut addrs = vec![dead];
    addrs.extend(b.status().listen);
    let started = tokio::time::Instant::now();
    let path = call(&a, b.peer_id(), addrs, "fallback").await.unwrap();
    let took = started.elapsed();
    assert_eq!(path, Path::Direct);
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(4),
        "connected after {took:?}: not the TCP fallback (due at 1.5 s)"
    );
    drop(hole);
    a.shutdown().await;
    b.shutdown().await;
}

/// A peer given several addresses of one relay (its QUIC and TCP ones, as a node gets the
/// coordinator's) holds ONE reservation there, for good. libp2p's relay client keeps one
/// reservation per connection to a relay: with a listener per address, each new reservation
/// closed the other listener, which the peer then made again at every retry, until the
/// relay's rate limit (30 reservations a peer, then one per 2 minutes) refused it and every
/// circuit to the peer was denied (found behind a symmetric NAT, from the 8th fresh caller on).
/// With a short retry interval, 12 fresh callers one after the other all reach the peer
/// through the relay, and the peer made one reservation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_reservation_per_relay_however_many_of_its_addresses() {
    let (relay, _) = start(40, |c| {
        c.listen = [quic(), tcp()].concat();
        c.relay_server = Some(RelayLimits::default());
    })
    .await;
    let relay_addrs: Vec<Multiaddr> = relay
        .status()
        .listen
        .iter()
        .map(|a| with_p2p(a, relay.peer_id()))
        .collect();
    assert_eq!(relay_addrs.len(), 2, "{relay_addrs:?}");
    let (b, b_in) = start(41, |c| {
        c.relays = relay_addrs.clone();
        c.relay_retry = Duration::from_millis(20);
    })
    .await;
    let _server = serve(b_in);
    until("a reservation on the relay", T, || {
        !b.status().relayed.is_empty()
    })
    .await;
    let circuit = b.status().relayed[0].clone();
    for i in 0..12u8 {
        let (a, _) = start(42 + i, |_| {}).await;
        let path = call(
            &a,
            b.peer_id(),
            vec![circuit.clone()],
            &format!("caller {i}"),
        )
        .await
        .unwrap_or_else(|e| panic!("fresh caller {i}: {e}"));
        assert_eq!(path, Path::Relayed, "fresh caller {i}");
        a.shutdown().await;
    }
    let m = b.metrics();
    let lost = m.relay_reservations_lost.load(Ordering::Relaxed);
    assert_eq!(lost, 0, "reservations lost");
    let made = m.relay_reservations.load(Ordering::Relaxed);
    assert_eq!(made, 1, "reservations made on the relay");
    assert!(!b.status().relayed.is_empty());
}
