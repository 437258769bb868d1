//! [`CtlClient`]: the one client of the control protocol (`skein/ctl`), shared by the node
//! agent and the SDK.
//!
//! One QUIC connection to the coordinator, opened on first use and opened again on the next
//! call once it is closed (a coordinator restart, an idle timeout). Each call is one request
//! frame and one answer frame on a stream of its own, both bounded by
//! [`CtlConfig::max_frame_len`]. An answer `CtlResponse::Error` comes back as
//! [`CtlError::Remote`] with the wire error as sent, so callers match on answers they expect and
//! never on errors.
//!
//! ```text
//!   node agent ─┐                       ┌─ call(envelope) ─▶ stream ─▶ coordinator
//!               ├─ CtlClient ─ connection┤
//!   SDK Client ─┘   (reconnect on demand)└─ connection() ─▶ raw streams (uploads, artifacts)
//! ```

use crate::endpoint::connect;
use crate::stream::call;
use crate::NetError;
use skein_proto::{AdminRequest, CtlEnvelope, CtlRequest, CtlResponse, ErrorCode, WireError};
use std::net::SocketAddr;
use std::time::Duration;

/// Settings of a [`CtlClient`].
#[derive(Debug, Clone)]
pub struct CtlConfig {
    /// The TLS server name the coordinator's certificate carries (default
    /// [`coordinator_server_name`](crate::coordinator_server_name)).
    pub server_name: String,
    /// Connection set-up timeout (default 5 s).
    pub connect_timeout: Duration,
    /// Longest wait for one call's answer (default `None`: until the connection's idle
    /// timeout ends it).
    pub call_timeout: Option<Duration>,
    /// Largest frame sent or accepted (default [`skein_proto::DEFAULT_MAX_FRAME_LEN`]).
    pub max_frame_len: u32,
}

impl Default for CtlConfig {
    fn default() -> Self {
        CtlConfig {
            server_name: crate::coordinator_server_name().to_string(),
            connect_timeout: Duration::from_secs(5),
            call_timeout: None,
            max_frame_len: skein_proto::DEFAULT_MAX_FRAME_LEN,
        }
    }
}

/// Why a control call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CtlError {
    /// The coordinator answered with an error (kept as it came over the wire).
    #[error(transparent)]
    Remote(WireError),
    /// No connection to the coordinator could be made.
    #[error("coordinator {addr} unreachable: {source}")]
    Unreachable {
        /// The coordinator's address.
        addr: SocketAddr,
        /// Why connecting failed.
        #[source]
        source: NetError,
    },
    /// The call failed on the way: stream, frame, timeout, or an answer that does not decode.
    #[error(transparent)]
    Net(#[from] NetError),
}

impl From<CtlError> for WireError {
    fn from(e: CtlError) -> Self {
        match e {
            CtlError::Remote(w) => w,
            CtlError::Net(n) => n.into(),
            e @ CtlError::Unreachable { .. } => WireError::new(ErrorCode::Internal, e.to_string()),
        }
    }
}

/// Whether sending `req` twice changes nothing, so it may be sent again after the connection
/// was lost under it.
pub fn read_only(req: &CtlRequest) -> bool {
    match req {
        CtlRequest::Resolve(_)
        | CtlRequest::ArtifactSources { .. }
        | CtlRequest::ListModels
        | CtlRequest::ListNodes
        | CtlRequest::GetTraffic { .. } => true,
        CtlRequest::Admin(a) => matches!(
            a,
            AdminRequest::ListTenants
                | AdminRequest::ListKeys { .. }
                | AdminRequest::Usage(_)
                | AdminRequest::Audit(_)
                | AdminRequest::WhoAmI
        ),
        _ => false,
    }
}

/// A control-protocol client of one coordinator (see the [module docs](self)).
#[derive(Debug)]
pub struct CtlClient {
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    tls: quinn::ClientConfig,
    config: CtlConfig,
    conn: tokio::sync::Mutex<Option<quinn::Connection>>,
}

impl CtlClient {
    /// A client of the coordinator at `addr`, connecting from `endpoint` with `tls` (ALPN
    /// `skein/ctl`). Nothing is sent until the first call.
    pub fn new(
        endpoint: quinn::Endpoint,
        addr: SocketAddr,
        tls: quinn::ClientConfig,
        config: CtlConfig,
    ) -> CtlClient {
        CtlClient {
            endpoint,
            addr,
            tls,
            config,
            conn: tokio::sync::Mutex::new(None),
        }
    }

    /// The coordinator's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The endpoint connections leave from (shared with the caller's other connections).
    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.endpoint
    }

    /// The settings.
    pub fn config(&self) -> &CtlConfig {
        &self.config
    }

    /// The open connection, or a new one if there is none or it was closed.
    pub async fn connection(&self) -> Result<quinn::Connection, CtlError> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref() {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let c = connect(
            &self.endpoint,
            self.tls.clone(),
            self.addr,
            &self.config.server_name,
            self.config.connect_timeout,
        )
        .await
        .map_err(|source| CtlError::Unreachable {
            addr: self.addr,
            source,
        })?;
        *guard = Some(c.clone());
        Ok(c)
    }

    /// Send `envelope` and return the answer with the connection's smoothed RTT after it.
    /// A [`read_only`] request whose connection was lost under it is sent once more on a new
    /// connection (a restarted coordinator answers the old connection with a reset).
    pub async fn call(&self, envelope: &CtlEnvelope) -> Result<(CtlResponse, Duration), CtlError> {
        let max = self.config.max_frame_len;
        let mut retried = false;
        let (frame, conn) = loop {
            let conn = self.connection().await?;
            let answer = call(&conn, envelope, &[], max);
            let answer = match self.config.call_timeout {
                Some(t) => tokio::time::timeout(t, answer)
                    .await
                    .unwrap_or(Err(NetError::Timeout(t))),
                None => answer.await,
            };
            match answer {
                Ok(frame) => break (frame, conn),
                Err(e)
                    if !retried
                        && !matches!(e, NetError::Timeout(_))
                        && read_only(&envelope.request)
                        && conn.close_reason().is_some() =>
                {
                    tracing::debug!(error = %e, "coordinator connection lost; reconnecting");
                    retried = true;
                }
                Err(e) => return Err(e.into()),
            }
        };
        match frame.header::<CtlResponse>().map_err(NetError::from)? {
            CtlResponse::Error(e) => Err(CtlError::Remote(e)),
            r => Ok((r, conn.rtt())),
        }
    }

    /// Send `req` without an API key (nodes authenticate by certificate) and return the answer.
    pub async fn request(&self, req: CtlRequest) -> Result<CtlResponse, CtlError> {
        Ok(self.call(&CtlEnvelope::anonymous(req)).await?.0)
    }

    /// Close the connection, if open (the next call opens a new one).
    pub async fn close(&self, reason: &[u8]) {
        if let Some(c) = self.conn.lock().await.take() {
            c.close(0u32.into(), reason);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::endpoint::{client_config, server_endpoint, TransportLimits};
    use crate::serve::{accept_loop, Request};
    use crate::stream::{read_frame, write_frame};
    use crate::tls::ClientAuth;
    use crate::MeshCa;
    use skein_proto::ALPN_CTL;
    use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
    use std::sync::Arc;
    use tokio_util::sync::CancellationToken;

    /// A stand-in coordinator on `127.0.0.1:0`: answers `ListModels` with an empty list and
    /// `ListNodes` with `Forbidden`; closes the connection on `ReportUsage` (a crash), and on
    /// the first `GetTraffic` only (later ones get an empty split). It serves one artifact,
    /// [`artifact`], and ends the first fetch's stream after [`CUT`] bytes (a broken transfer).
    pub(crate) struct Stand {
        pub(crate) addr: SocketAddr,
        pub(crate) connections: Arc<AtomicU32>,
        pub(crate) cancel: CancellationToken,
        pub(crate) client: CtlClient,
        /// Artifact bytes sent.
        pub(crate) sent: Arc<AtomicU64>,
    }

    /// Bytes the first artifact fetch gets before its stream ends.
    pub(crate) const CUT: u64 = 300_000;

    /// Bytes the first range fetch (`FetchArtifactRange`) gets before its stream ends.
    pub(crate) const CUT_RANGE: u64 = 100_000;

    /// Chunk size of the stand's manifest.
    const STAND_CHUNK: u64 = 1 << 18;

    /// The artifact the stand serves (a fixed pattern) and its id.
    pub(crate) fn artifact() -> (Vec<u8>, skein_proto::ArtifactId) {
        use sha2::Digest;
        let bytes: Vec<u8> = (0..1_000_000usize).map(|i| (i * 31 % 251) as u8).collect();
        let d: [u8; 32] = sha2::Sha256::digest(&bytes).into();
        (bytes, skein_proto::ArtifactId::from_digest(&d))
    }

    pub(crate) async fn stand() -> Stand {
        let ca = MeshCa::ephemeral().unwrap();
        let server_creds = ca.issue_coordinator().unwrap();
        let limits = TransportLimits::default();
        let ep = server_endpoint(
            "127.0.0.1:0".parse().unwrap(),
            &server_creds,
            &[ALPN_CTL],
            ClientAuth::Optional,
            &limits,
        )
        .unwrap();
        let addr = ep.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let seen = Arc::new(std::sync::Mutex::new(Vec::<usize>::new()));
        let connections = Arc::new(AtomicU32::new(0));
        let traffic_calls = Arc::new(AtomicU32::new(0));
        let fetches = Arc::new(AtomicU32::new(0));
        let sent = Arc::new(AtomicU64::new(0));
        let (bytes, id) = artifact();
        let bytes = Arc::new(bytes);
        let handler = {
            let (seen, connections, sent) = (seen.clone(), connections.clone(), sent.clone());
            move |mut r: Request| {
                let (seen, connections, traffic_calls) =
                    (seen.clone(), connections.clone(), traffic_calls.clone());
                let (fetches, sent, bytes, id) =
                    (fetches.clone(), sent.clone(), bytes.clone(), id.clone());
                async move {
                    {
                        let mut seen = seen.lock().unwrap();
                        if !seen.contains(&r.conn.stable_id()) {
                            seen.push(r.conn.stable_id());
                            connections.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    let f = read_frame(&mut r.recv, 1 << 20).await.unwrap();
                    let env: CtlEnvelope = f.header().unwrap();
                    let answer = match env.request {
                        CtlRequest::ListModels => CtlResponse::Models(Vec::new()),
                        CtlRequest::ReportUsage(_) => {
                            r.conn.close(7u32.into(), b"crash");
                            return;
                        }
                        CtlRequest::GetTraffic { .. }
                            if traffic_calls.fetch_add(1, Ordering::SeqCst) == 0 =>
                        {
                            r.conn.close(7u32.into(), b"crash");
                            return;
                        }
                        CtlRequest::GetTraffic { .. } => CtlResponse::Traffic(Vec::new()),
                        CtlRequest::FetchArtifact { sha256, offset } if id == sha256 => {
                            let total = bytes.len() as u64;
                            let head = CtlResponse::Artifact {
                                total,
                                size: total - offset,
                            };
                            write_frame(&mut r.send, &head, &[], 1 << 20).await.unwrap();
                            let mut end = total;
                            if fetches.fetch_add(1, Ordering::SeqCst) == 0 {
                                end = end.min(offset + CUT);
                            }
                            let part = &bytes[offset as usize..end as usize];
                            r.send.write_all(part).await.unwrap();
                            sent.fetch_add(part.len() as u64, Ordering::SeqCst);
                            let _ = r.send.finish();
                            let _ = r.send.stopped().await;
                            return;
                        }
                        CtlRequest::ArtifactSources { sha256 } if id == sha256 => {
                            let m = crate::artifact::manifest_of_reader(&bytes[..], STAND_CHUNK)
                                .unwrap();
                            CtlResponse::ArtifactSources(skein_proto::ArtifactSources {
                                manifest: crate::artifact::manifest_to_wire(&m),
                                holders: Vec::new(),
                                grant: Default::default(),
                            })
                        }
                        CtlRequest::ArtifactSources { sha256 } => {
                            CtlResponse::Error(WireError::new(
                                ErrorCode::UnknownArtifact,
                                format!("no artifact {sha256}"),
                            ))
                        }
                        CtlRequest::FetchArtifactRange {
                            sha256,
                            offset,
                            len,
                        } if id == sha256 => {
                            let total = bytes.len() as u64;
                            let end = (offset + len).min(total);
                            let head = CtlResponse::Artifact {
                                total,
                                size: end - offset,
                            };
                            write_frame(&mut r.send, &head, &[], 1 << 20).await.unwrap();
                            let mut stop = end;
                            if fetches.fetch_add(1, Ordering::SeqCst) == 0 {
                                stop = stop.min(offset + CUT_RANGE);
                            }
                            let part = &bytes[offset as usize..stop as usize];
                            r.send.write_all(part).await.unwrap();
                            sent.fetch_add(part.len() as u64, Ordering::SeqCst);
                            let _ = r.send.finish();
                            let _ = r.send.stopped().await;
                            return;
                        }
                        CtlRequest::FetchArtifact { sha256, .. } => {
                            CtlResponse::Error(WireError::new(
                                ErrorCode::UnknownArtifact,
                                format!("no artifact {sha256}"),
                            ))
                        }
                        _ => {
                            CtlResponse::Error(WireError::new(ErrorCode::Forbidden, "not for you"))
                        }
                    };
                    write_frame(&mut r.send, &answer, &[], 1 << 20)
                        .await
                        .unwrap();
                    let _ = r.send.finish();
                    let _ = r.send.stopped().await;
                }
            }
        };
        tokio::spawn(accept_loop(ep, cancel.clone(), 16, handler));
        let client_creds = ca.issue_client("test").unwrap();
        let client_ep = crate::client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
        let client = CtlClient::new(
            client_ep,
            addr,
            client_config(&client_creds, ALPN_CTL, &limits).unwrap(),
            CtlConfig::default(),
        );
        Stand {
            addr,
            connections,
            cancel,
            client,
            sent,
        }
    }

    #[tokio::test]
    async fn an_error_answer_is_an_err_with_the_wire_error_kept() {
        let s = stand().await;
        let e = s.client.request(CtlRequest::ListNodes).await.unwrap_err();
        match &e {
            CtlError::Remote(w) => {
                assert_eq!(w.code, ErrorCode::Forbidden);
                assert_eq!(w.message, "not for you");
            }
            other => panic!("expected a remote error, got {other:?}"),
        }
        let w: WireError = e.into();
        assert_eq!(w.code, ErrorCode::Forbidden);
        // The connection stays usable after an error answer.
        let ok = s.client.request(CtlRequest::ListModels).await.unwrap();
        assert!(matches!(ok, CtlResponse::Models(m) if m.is_empty()));
        assert_eq!(s.connections.load(Ordering::SeqCst), 1);
        s.cancel.cancel();
    }

    #[tokio::test]
    async fn reconnects_after_the_server_closes_the_connection() {
        let s = stand().await;
        s.client.request(CtlRequest::ListModels).await.unwrap();
        assert_eq!(s.connections.load(Ordering::SeqCst), 1);
        // The server drops the connection in the middle of a call that changes state: that
        // call fails (it is not sent twice) ...
        let e = s
            .client
            .request(CtlRequest::ReportUsage(Vec::new()))
            .await
            .unwrap_err();
        assert!(matches!(e, CtlError::Net(_)), "{e:?}");
        assert_eq!(s.connections.load(Ordering::SeqCst), 1);
        // ... and the next call goes out on a new connection.
        let ok = s.client.request(CtlRequest::ListModels).await.unwrap();
        assert!(matches!(ok, CtlResponse::Models(_)));
        assert_eq!(s.connections.load(Ordering::SeqCst), 2);
        s.cancel.cancel();
    }

    #[tokio::test]
    async fn a_read_only_call_whose_connection_is_lost_is_sent_once_more() {
        let s = stand().await;
        s.client.request(CtlRequest::ListModels).await.unwrap();
        // The first `GetTraffic` loses its connection; the client resends it on a new one.
        let ok = s
            .client
            .request(CtlRequest::GetTraffic { name: "m".into() })
            .await
            .unwrap();
        assert!(matches!(ok, CtlResponse::Traffic(w) if w.is_empty()));
        assert_eq!(s.connections.load(Ordering::SeqCst), 2);
        s.cancel.cancel();
    }

    #[tokio::test]
    async fn a_closed_client_connection_is_opened_again_on_the_next_call() {
        let s = stand().await;
        s.client.request(CtlRequest::ListModels).await.unwrap();
        s.client.close(b"test").await;
        s.client.request(CtlRequest::ListModels).await.unwrap();
        assert_eq!(s.connections.load(Ordering::SeqCst), 2);
        s.cancel.cancel();
    }

    #[tokio::test]
    async fn an_unreachable_coordinator_is_named() {
        let s = stand().await;
        s.cancel.cancel();
        // Nothing listens on a fresh port of a closed endpoint: bind one and drop it.
        let gone = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = gone.local_addr().unwrap();
        drop(gone);
        let c = CtlClient::new(
            s.client.endpoint().clone(),
            addr,
            s.client.tls.clone(),
            CtlConfig {
                connect_timeout: Duration::from_millis(300),
                ..CtlConfig::default()
            },
        );
        let e = c.request(CtlRequest::ListModels).await.unwrap_err();
        assert!(
            matches!(&e, CtlError::Unreachable { addr: a, .. } if *a == addr),
            "{e:?}"
        );
        assert!(e.to_string().contains(&addr.to_string()), "{e}");
        let _ = s.addr;
    }

    #[tokio::test]
    async fn an_answer_larger_than_the_frame_bound_is_refused() {
        let s = stand().await;
        let tiny = CtlClient::new(
            s.client.endpoint().clone(),
            s.addr,
            s.client.tls.clone(),
            CtlConfig {
                max_frame_len: 4,
                ..CtlConfig::default()
            },
        );
        // The request itself does not fit in four bytes: refused before anything is sent.
        let e = tiny.request(CtlRequest::ListModels).await.unwrap_err();
        assert!(matches!(&e, CtlError::Net(NetError::Frame(_))), "{e:?}");
        s.cancel.cancel();
    }
}
