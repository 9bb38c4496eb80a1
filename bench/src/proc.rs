//! Child processes (server, upstreams) and their CPU and memory, read from /proc.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Proc {
    pub child: Child,
    pub base: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stop(mut self) {
        // SIGTERM first: the server drains and its consumers commit.
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        // Gone for good before the caller goes on (a rebuild needs the database file let go).
        let _ = self.child.wait();
    }
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Start `program args…` (stdout/stderr to `log`), then wait for `health` to answer 200.
pub async fn spawn(
    name: &str,
    program: &std::path::Path,
    args: &[String],
    envs: &[(&str, String)],
    log: &std::path::Path,
    health: &str,
) -> anyhow::Result<Proc> {
    let port = free_port()?;
    let mut command = Command::new(program);
    command.args(args.iter().map(|a| a.replace("{port}", &port.to_string())));
    for (k, v) in envs {
        command.env(k, v);
    }
    let out = std::fs::File::create(log)?;
    command.stdout(Stdio::from(out.try_clone()?)).stderr(Stdio::from(out)).stdin(Stdio::null());
    let child = command.spawn().map_err(|e| anyhow::anyhow!("cannot start {}: {e}", program.display()))?;
    let proc = Proc { child, base: format!("http://127.0.0.1:{port}") };
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if client.get(format!("{}{health}", proc.base)).send().await.is_ok_and(|r| r.status().is_success()) {
            return Ok(proc);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("{name} did not become healthy; see {}", log.display())
}

/// CPU time (seconds, user + system) and resident memory (KiB) of a process.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at: Instant,
    pub cpu_secs: f64,
    pub rss_kib: u64,
}

pub fn sample(pid: u32) -> Sample {
    let at = Instant::now();
    let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // Fields after the command name (which may contain spaces) start after the last ')'.
            let rest = stat.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = fields.get(11)?.parse().ok()?;
            let stime: f64 = fields.get(12)?.parse().ok()?;
            Some(utime + stime)
        })
        .unwrap_or(0.0);
    let rss_kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    Sample { at, cpu_secs: ticks / clock_ticks(), rss_kib }
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Average CPU use (percent of one core) between two samples.
pub fn cpu_percent(from: &Sample, to: &Sample) -> f64 {
    let wall = to.at.duration_since(from.at).as_secs_f64().max(1e-9);
    100.0 * (to.cpu_secs - from.cpu_secs) / wall
}
