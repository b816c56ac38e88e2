//! What the benchmarks (and the tests) read from /proc: a process's memory,
//! CPU time and children, the machine's CPU time, every process's CPU time
//! by name, and this thread's CPU clock. Linux only; where /proc does not
//! say, zeros.

/// (VmRSS, VmHWM) of a process in KiB, from /proc.
pub(crate) fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The processes whose parent is `pid`.
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&child| {
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            // The fields after the command name, which may hold spaces.
            let parent = stat
                .rfind(')')
                .and_then(|i| stat[i + 2..].split(' ').nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            parent == Some(pid)
        })
        .collect()
}

/// This thread's CPU time in nanoseconds (the first field of its
/// schedstat), or 0 where /proc does not say.
pub(crate) fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A process's user + system CPU time in seconds, all threads, including
/// threads that have exited (/proc/PID/stat, in USER_HZ = 100 ticks).
pub fn process_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name may contain spaces: fields are counted after ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15; field 3 is fields[0].
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// (busy, total) CPU time of the whole machine in seconds, from /proc/stat.
pub(crate) fn machine_cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is in user).
    let at = |i: usize| ticks.get(i).copied().unwrap_or(0) as f64 / 100.0;
    let idle = at(3) + at(4);
    let total: f64 = (0..8).map(at).sum();
    (total - idle, total)
}

/// CPU seconds used so far by every process, by pid, with a name to group
/// them by: the command, or for Python the script and whether it is the
/// instant embedder.
pub(crate) fn cpu_by_process() -> std::collections::HashMap<u32, (String, f64)> {
    let mut out = std::collections::HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let comm = stat
            .split_once('(')
            .and_then(|(_, rest)| rest.rsplit_once(')'))
            .map_or("?", |(c, _)| c);
        let name = if comm.starts_with("python") {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let script = args
                .get(1)
                .and_then(|a| a.rsplit('/').next())
                .unwrap_or(comm);
            if args.iter().any(|a| a == "--instant") {
                format!("{script} --instant")
            } else {
                script.to_string()
            }
        } else {
            comm.to_string()
        };
        out.insert(pid, (name, process_cpu_seconds(pid)));
    }
    out
}

/// CPU seconds between two snapshots, summed by name, most first; the
/// worker under test is named "worker (bench child)".
pub(crate) fn busiest_processes(
    before: &std::collections::HashMap<u32, (String, f64)>,
    after: &std::collections::HashMap<u32, (String, f64)>,
    worker: u32,
) -> Vec<(String, f64)> {
    let mut by_name: std::collections::HashMap<String, f64> = std::collections::HashMap::new();
    for (pid, (name, seconds)) in after {
        let earlier = before.get(pid).map_or(0.0, |(_, s)| *s);
        let name = if *pid == worker {
            "worker (bench child)".to_string()
        } else if *pid == std::process::id() {
            "bench-pipeline".to_string()
        } else {
            name.clone()
        };
        *by_name.entry(name).or_default() += seconds - earlier;
    }
    let mut v: Vec<(String, f64)> = by_name.into_iter().filter(|(_, s)| *s >= 0.005).collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}
