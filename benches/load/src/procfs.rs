//! A process's own CPU time and memory, from /proc: `utime + stime` of `/proc/PID/stat`
//! and `VmRSS` of `/proc/PID/status`, summed over the process and its descendants (nginx's
//! and haproxy's workers; ssegate's threads are already in its own numbers).

use std::collections::HashMap;

/// `(ppid, utime + stime in clock ticks)` from the text of `/proc/PID/stat`.
pub fn parse_stat(text: &str) -> Option<(u32, u64)> {
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): ppid is field 4, utime 14, stime 15.
    let ppid = f.get(1)?.parse().ok()?;
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

/// `VmRSS` in KiB from the text of `/proc/PID/status`.
pub fn parse_rss_kib(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Clock ticks per second of `/proc/PID/stat` times.
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// `pid` and all its descendants that are alive now.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut parent: HashMap<u32, u32> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some((ppid, _)) = std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .as_deref()
                .and_then(parse_stat)
            {
                parent.insert(p, ppid);
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let cur = out[i];
        out.extend(parent.iter().filter(|&(_, &pp)| pp == cur).map(|(&c, _)| c));
        i += 1;
    }
    out
}

/// CPU seconds and RSS of a process tree at one moment.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    /// User + system CPU seconds, summed over the tree.
    pub cpu_s: f64,
    /// Resident memory in KiB, summed over the tree.
    pub rss_kib: u64,
    /// Processes in the tree.
    pub procs: usize,
}

/// Samples `pid` and its descendants. CPU of descendants that already exited is lost, so
/// targets keep their workers for the whole measurement.
pub fn sample(pid: u32) -> Sample {
    let tps = ticks_per_second();
    let mut s = Sample::default();
    for p in tree(pid) {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok();
        let status = std::fs::read_to_string(format!("/proc/{p}/status")).ok();
        if let Some((_, ticks)) = stat.as_deref().and_then(parse_stat) {
            s.cpu_s += ticks as f64 / tps;
            s.procs += 1;
        }
        s.rss_kib += status.as_deref().and_then(parse_rss_kib).unwrap_or(0);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_a_tricky_name() {
        let text = "4242 (nginx: (worker) x) S 17 4242 4242 0 -1 4194624 1 0 0 0 250 31 0 0 20 0 1 0 99 1 2";
        assert_eq!(parse_stat(text), Some((17, 281)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn rss_line() {
        let text = "Name:\tx\nVmPeak:\t  10 kB\nVmRSS:\t    5120 kB\nThreads:\t3\n";
        assert_eq!(parse_rss_kib(text), Some(5120));
        assert_eq!(parse_rss_kib("Name: x\n"), None);
    }

    #[test]
    fn own_process_is_sampled() {
        let s = sample(std::process::id());
        assert!(s.procs >= 1 && s.rss_kib > 0);
    }
}
