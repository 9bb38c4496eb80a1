//! P5's floor: a process that does nothing but write a view frame to many TCP sockets.
//!
//! The P5 measure starts it as `tally-bench fanout-floor-sender` (hidden). It listens on a free
//! loopback port (its first line of output), accepts plain TCP connections, and for each
//! position read from its input writes that position's view message (the very frame bytes the
//! server writes) to every socket accepted so far, then answers `sent <position> to <sockets>`.
//! There is no HTTP, no WebSocket handshake, no hub, no runtime: what P5's delivery takes beyond
//! this floor is the server's; the floor itself is the kernel's loopback TCP and the clients.

use anyhow::Context;
use std::io::{BufRead, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::mpsc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

/// The sender process: until its input ends.
///
/// One writer thread per core, each with its share of the sockets (the server too writes from
/// every core), each writing with plain blocking `write` calls.
pub fn serve(view: &Path, topic: &str) -> anyhow::Result<()> {
    let view_json = std::fs::read_to_string(view).with_context(|| format!("reading {}", view.display()))?;
    let listener = listen()?;
    println!("listening {}", listener.local_addr()?);
    let (accepted_tx, accepted) = mpsc::channel();
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            // As the server's sockets: no Nagle delay.
            let _ = tcp.set_nodelay(true);
            if accepted_tx.send(tcp).is_err() {
                return;
            }
        }
    });
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let (done_tx, done) = mpsc::channel();
    let writers: Vec<mpsc::Sender<Round>> = (0..threads)
        .map(|_| {
            let (tx, rx) = mpsc::channel();
            let done = done_tx.clone();
            std::thread::spawn(move || write_rounds(rx, done));
            tx
        })
        .collect();
    let mut next = 0;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let position: u64 = line.trim().parse().with_context(|| format!("not a position: {line:?}"))?;
        // The very bytes the server writes for this change.
        let frame = server::live::view_frame(topic, position, &view_json).bytes;
        // Sockets accepted since the last round, dealt out to the writers.
        let mut new: Vec<Vec<TcpStream>> = (0..threads).map(|_| Vec::new()).collect();
        for tcp in accepted.try_iter() {
            new[next % threads].push(tcp);
            next += 1;
        }
        for (writer, sockets) in writers.iter().zip(new) {
            writer.send(Round { sockets, frame: frame.clone() })?;
        }
        let mut sockets = 0;
        for _ in 0..threads {
            sockets += done.recv()?;
        }
        println!("sent {position} to {sockets}");
    }
    Ok(())
}

/// A loopback listener whose queue holds every client at once. The clients never write: one
/// dropped from a full queue would think itself connected and wait forever.
fn listen() -> anyhow::Result<TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind("127.0.0.1:0".parse()?)?;
    let listener = socket.listen(LISTEN_QUEUE)?.into_std()?;
    listener.set_nonblocking(false)?;
    Ok(listener)
}

/// The kernel caps it at `net.core.somaxconn` (4,096 by default).
const LISTEN_QUEUE: u32 = 16_384;

struct Round {
    sockets: Vec<TcpStream>,
    frame: bytes::Bytes,
}

fn write_rounds(rounds: mpsc::Receiver<Round>, done: mpsc::Sender<usize>) {
    let mut sockets = Vec::new();
    for round in rounds {
        sockets.extend(round.sockets);
        // A socket its client closed is dropped.
        sockets.retain_mut(|tcp: &mut TcpStream| tcp.write_all(&round.frame).is_ok());
        if done.send(sockets.len()).is_err() {
            return;
        }
    }
}

/// The measure's handle on a running sender process (killed when dropped).
pub struct Sender {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    /// Where the clients connect.
    pub addr: String,
}

impl Sender {
    pub async fn start(view: &Path, topic: &str) -> anyhow::Result<Self> {
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .arg("fanout-floor-sender")
            .arg("--view")
            .arg(view)
            .args(["--topic", topic])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting the floor sender")?;
        let stdin = child.stdin.take().context("no stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().context("no stdout")?).lines();
        let first = stdout.next_line().await?.context("the floor sender stopped before listening")?;
        let addr = first.strip_prefix("listening ").with_context(|| format!("unexpected: {first}"))?.to_string();
        Ok(Sender { child, stdin, stdout, addr })
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Write `position`'s frame to every socket accepted so far; returns once all are written.
    pub async fn send(&mut self, position: u64) -> anyhow::Result<()> {
        self.stdin.write_all(format!("{position}\n").as_bytes()).await?;
        self.stdin.flush().await?;
        let line = self.stdout.next_line().await?.context("the floor sender stopped")?;
        anyhow::ensure!(line.starts_with(&format!("sent {position} ")), "unexpected: {line}");
        Ok(())
    }
}
