//! Control connections: greet, parse, forward to the control loop, write back.
//! A connection never touches the kernel itself, and a misbehaving client
//! (garbage, a giant frame, a hang-up mid-stream) only ends its own connection.
//! A start's components are compiled here, before the loop sees the start.

use spindle_driver_wasm::runtime::Loader;
use spindle_logs::{LogChunk, Stream};
use spindle_types::ProcessNum;
use spindle_types::control::{
    ErrorKind, LogStream, MAX_FRAME, PROTOCOL_VERSION, Request, Response,
};
use std::io;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, mpsc, oneshot};

/// Lines buffered per log follower between the capture tasks and its socket.
const FOLLOW_QUEUE: usize = 4096;

/// What the control loop answers.
pub enum Reply {
    One(Response),
    /// Past lines, then (if any) live lines from these channels.
    Logs {
        backlog: Vec<Response>,
        follow: Vec<Follow>,
    },
    /// Lifecycle events, as they happen.
    Events(broadcast::Receiver<spindle_types::control::ProcessEvent>),
    /// The bus's traffic and lifecycle events, as they happen.
    Trace(crate::trace::Subscription),
}

/// A live log subscription for one process.
pub struct Follow {
    pub num: ProcessNum,
    pub name: Option<String>,
    pub stream: LogStream,
    pub rx: broadcast::Receiver<LogChunk>,
}

/// A request on its way to the control loop, with where to send the answer.
pub type Call = (Request, oneshot::Sender<Reply>);

pub async fn accept_loop(
    listener: UnixListener,
    calls: mpsc::Sender<Call>,
    loader: Loader,
    owner: Option<u32>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(connection(stream, calls.clone(), loader.clone(), owner));
            }
            Err(e) => {
                tracing::warn!("control socket accept failed: {e}");
                tokio::task::yield_now().await;
            }
        }
    }
}

/// Manifest entries as specs, by the manifest's rules; the error names the
/// entry and the key, as for a manifest file.
fn entries_to_specs(
    entries: Vec<spindle_types::manifest::RawProcess>,
    base: &std::path::Path,
) -> Result<Vec<spindle_types::ProcessSpec>, String> {
    if !base.is_absolute() {
        return Err(format!(
            "base {} is not an absolute path: give the directory relative paths are taken from",
            base.display()
        ));
    }
    entries
        .into_iter()
        .enumerate()
        .map(|(i, raw)| {
            raw.into_spec(i + 1, base)
                .map_err(|e| format!("{e}; nothing was started"))
        })
        .collect()
}

/// Compiles the components of a start here, so the control loop, which
/// checks the start, finds them loaded and never compiles one itself. (A
/// component that fails is reported by the loop's check.)
async fn warm(loader: &Loader, specs: &[spindle_types::ProcessSpec]) {
    for spec in specs.iter().filter(|s| s.check().is_ok()) {
        if let spindle_types::Program::Wasm { path, .. } = &spec.program {
            let _ = loader.warm(path, spec.parent.is_some()).await;
        }
    }
}

async fn read_frame(r: &mut BufReader<OwnedReadHalf>) -> io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::new();
    let n = (&mut *r)
        .take(MAX_FRAME as u64 + 1)
        .read_until(b'\n', &mut buf)
        .await?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        if buf.len() > MAX_FRAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("control frame over {MAX_FRAME} bytes"),
            ));
        }
        return Ok(None);
    }
    Ok(Some(buf))
}

pub(crate) async fn write(w: &mut OwnedWriteHalf, resp: &Response) -> io::Result<()> {
    let mut line = serde_json::to_vec(resp).expect("responses serialise");
    line.push(b'\n');
    w.write_all(&line).await
}

fn error(kind: ErrorKind, message: impl Into<String>) -> Response {
    Response::Error {
        kind,
        message: message.into(),
    }
}

async fn connection(
    stream: UnixStream,
    calls: mpsc::Sender<Call>,
    loader: Loader,
    owner: Option<u32>,
) {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    if let Err(e) = serve(&mut r, &mut w, &calls, &loader, owner).await {
        let _ = write(&mut w, &error(ErrorKind::BadRequest, e.to_string())).await;
    }
}

async fn serve(
    r: &mut BufReader<OwnedReadHalf>,
    w: &mut OwnedWriteHalf,
    calls: &mpsc::Sender<Call>,
    loader: &Loader,
    owner: Option<u32>,
) -> io::Result<()> {
    let mut greeted = false;
    while let Some(frame) = read_frame(r).await? {
        let req = match serde_json::from_slice::<Request>(&frame) {
            Ok(req) => req,
            Err(e) => {
                write(
                    w,
                    &error(ErrorKind::BadRequest, format!("unreadable request: {e}")),
                )
                .await?;
                continue;
            }
        };
        if let Request::Hello { protocol, version } = &req {
            if *protocol != PROTOCOL_VERSION {
                let msg = format!(
                    "this client (spindle {version}) speaks control protocol {protocol}, the daemon (spindle {}) speaks {PROTOCOL_VERSION}: use the matching spindle binary, or stop the daemon (`kill {}`) and let the new one start",
                    env!("CARGO_PKG_VERSION"),
                    std::process::id()
                );
                write(w, &error(ErrorKind::VersionMismatch, msg)).await?;
                return Ok(());
            }
            greeted = true;
            let hello = Response::Hello {
                protocol: PROTOCOL_VERSION,
                version: env!("CARGO_PKG_VERSION").into(),
                pid: std::process::id(),
                owner,
            };
            write(w, &hello).await?;
            continue;
        }
        if !greeted {
            write(
                w,
                &error(
                    ErrorKind::BadRequest,
                    "say hello first: {\"op\":\"hello\",\"protocol\":1,…}",
                ),
            )
            .await?;
            return Ok(());
        }
        let req = match req {
            Request::StartEntries {
                processes,
                base,
                if_absent,
            } => match entries_to_specs(processes, &base) {
                Ok(specs) => Request::Start { specs, if_absent },
                Err(e) => {
                    write(w, &error(ErrorKind::InvalidSpec, e)).await?;
                    continue;
                }
            },
            req => req,
        };
        if let Request::Start { specs, .. } = &req {
            warm(loader, specs).await;
        }
        let (tx, rx) = oneshot::channel();
        if calls.send((req, tx)).await.is_err() {
            write(w, &error(ErrorKind::ShuttingDown, "the daemon is stopping")).await?;
            return Ok(());
        }
        match rx.await {
            Ok(Reply::One(resp)) => write(w, &resp).await?,
            Ok(Reply::Logs { backlog, follow }) => {
                for line in &backlog {
                    write(w, line).await?;
                }
                if follow.is_empty() {
                    write(w, &Response::LogEnd).await?;
                } else {
                    return stream_logs(r, w, follow).await;
                }
            }
            Ok(Reply::Events(rx)) => return stream_events(r, w, rx).await,
            Ok(Reply::Trace(sub)) => return crate::trace::stream(r, w, sub).await,
            Err(_) => write(w, &error(ErrorKind::ShuttingDown, "the daemon is stopping")).await?,
        }
    }
    Ok(())
}

/// Streams events until the client hangs up (or the daemon ends); a
/// subscriber too slow for them hears how many it missed.
async fn stream_events(
    r: &mut BufReader<OwnedReadHalf>,
    w: &mut OwnedWriteHalf,
    mut rx: broadcast::Receiver<spindle_types::control::ProcessEvent>,
) -> io::Result<()> {
    write(w, &Response::Subscribed).await?;
    let mut probe = [0u8; 64];
    loop {
        tokio::select! {
            got = rx.recv() => match got {
                Ok(event) => write(w, &Response::Event(event)).await?,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    write(w, &Response::EventGap { missed }).await?
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            },
            n = r.read(&mut probe) => match n {
                Ok(0) | Err(_) => return Ok(()),
                Ok(_) => {}
            },
        }
    }
}

/// Streams live lines until the client hangs up.
async fn stream_logs(
    r: &mut BufReader<OwnedReadHalf>,
    w: &mut OwnedWriteHalf,
    follow: Vec<Follow>,
) -> io::Result<()> {
    let (tx, mut rx) = mpsc::channel::<Response>(FOLLOW_QUEUE);
    let mut tasks = vec![];
    for f in follow {
        let tx = tx.clone();
        tasks.push(tokio::spawn(forward(f, tx)));
    }
    drop(tx);
    let mut probe = [0u8; 64];
    let result = loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(resp) => if let Err(e) = write(w, &resp).await { break Err(e) },
                None => break write(w, &Response::LogEnd).await,
            },
            n = r.read(&mut probe) => match n {
                Ok(0) | Err(_) => break Ok(()),
                Ok(_) => {}
            },
        }
    };
    for t in tasks {
        t.abort();
    }
    result
}

async fn forward(mut f: Follow, tx: mpsc::Sender<Response>) {
    loop {
        match f.rx.recv().await {
            Ok(chunk) => {
                let wanted = match (f.stream, chunk.stream) {
                    (LogStream::Both, _) => true,
                    (LogStream::Out, s) => s == Stream::Out,
                    (LogStream::Err, s) => s == Stream::Err,
                };
                if !wanted {
                    continue;
                }
                let stream = match chunk.stream {
                    Stream::Out => LogStream::Out,
                    Stream::Err => LogStream::Err,
                };
                let text = chunk.lines.strip_suffix(b"\n").unwrap_or(&chunk.lines);
                for line in text.split(|&b| b == b'\n') {
                    let resp = Response::LogLine {
                        id: f.num,
                        name: f.name.clone(),
                        stream,
                        line: String::from_utf8_lossy(line).into_owned(),
                    };
                    if tx.send(resp).await.is_err() {
                        return;
                    }
                }
            }
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                if tx
                    .send(Response::LogGap { id: f.num, missed })
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}
