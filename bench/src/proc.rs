//! What the benchmarks read about processes and servers: CPU time, RSS, redis-benchmark.

use anyhow::{Context, bail};

/// User + system CPU seconds of a process so far.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').context("odd /proc stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11).context("no utime")?.parse()?;
    let stime: f64 = fields.get(12).context("no stime")?.parse()?;
    Ok((utime + stime) / 100.0) // USER_HZ is 100 on Linux
}

/// `host`, `port` of a `redis://host:port` URL.
pub fn redis_host_port(url: &str) -> anyhow::Result<(String, u16)> {
    let rest = url
        .strip_prefix("redis://")
        .context("redis URL must start with redis://")?;
    let hostport = rest.split(['/', '?']).next().unwrap_or(rest);
    let (host, port) = hostport
        .rsplit_once(':')
        .context("redis URL needs host:port")?;
    Ok((host.to_owned(), port.parse()?))
}

/// Requests per second `redis-benchmark -c 50 -P 64` reaches for one custom command.
pub fn redis_benchmark(
    host: &str,
    port: u16,
    requests: u64,
    command: &[&str],
) -> anyhow::Result<f64> {
    let out = std::process::Command::new("redis-benchmark")
        .args([
            "-h",
            host,
            "-p",
            &port.to_string(),
            "-c",
            "50",
            "-P",
            "64",
            "-n",
            &requests.to_string(),
            "-q",
        ])
        .args(command) // may start with `-r N` (random key space) before the command
        .output()
        .context("cannot run redis-benchmark (Debian's redis-tools)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "…: 612345.67 requests per second, p50=…" (the last progress line wins).
    for line in text.rsplit(['\n', '\r']) {
        if let Some(before) = line.split(" requests per second").next()
            && line.contains(" requests per second")
            && let Some(num) = before.rsplit(' ').next()
        {
            return Ok(num.parse()?);
        }
    }
    bail!("unexpected redis-benchmark output: {text}")
}

/// A redis `INFO` section as key → value.
pub async fn redis_info(
    conn: &mut redis::aio::MultiplexedConnection,
    section: &str,
) -> anyhow::Result<std::collections::HashMap<String, String>> {
    let text: String = redis::cmd("INFO").arg(section).query_async(conn).await?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect())
}

pub async fn redis_cpu_seconds(
    conn: &mut redis::aio::MultiplexedConnection,
) -> anyhow::Result<f64> {
    let info = redis_info(conn, "cpu").await?;
    let get = |k: &str| {
        info.get(k)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Ok(get("used_cpu_user") + get("used_cpu_sys"))
}
