//! Processes as `/proc` shows them: a process's parent, name and command line, its
//! descendants, the pids with a given name. Linux only, like everything the tests run.

/// The parent pid and command name of `pid`, from `/proc/<pid>/stat`.
fn ppid_and_name(pid: u32) -> Option<(u32, String)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_ppid_and_name(&stat)
}

/// `pid (name) state ppid …` → `(ppid, name)`; the name may hold spaces or parentheses.
fn parse_ppid_and_name(stat: &str) -> Option<(u32, String)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat.get(open + 1..close)?.to_owned();
    let ppid = stat[close + 1..].split_whitespace().nth(1)?.parse().ok()?;
    Some((ppid, name))
}

/// The command name of `pid` (`/proc/<pid>/comm`, at most 15 bytes).
pub fn process_name(pid: u32) -> Option<String> {
    ppid_and_name(pid).map(|(_, name)| name)
}

/// The command line of `pid`, its arguments joined by spaces (`/proc/<pid>/cmdline`, which
/// every user of the machine can read).
pub fn command_line(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<_> = raw
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(String::from_utf8_lossy)
        .collect();
    Some(args.join(" "))
}

/// Pids of every process /proc lists now.
fn all_pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .collect()
}

/// Every live descendant of `root` (children, their children, …), with its command name.
pub fn descendants(root: u32) -> Vec<(u32, String)> {
    let procs: Vec<(u32, u32, String)> = all_pids()
        .into_iter()
        .filter_map(|pid| ppid_and_name(pid).map(|(ppid, name)| (pid, ppid, name)))
        .collect();
    let mut out: Vec<(u32, String)> = Vec::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for (pid, ppid, name) in &procs {
            if *ppid == parent && !out.iter().any(|(p, _)| p == pid) {
                out.push((*pid, name.clone()));
                frontier.push(*pid);
            }
        }
    }
    out.sort();
    out
}

/// Pids of live processes whose command name is `name`.
pub fn pids_named(name: &str) -> Vec<u32> {
    all_pids()
        .into_iter()
        .filter(|pid| process_name(*pid).as_deref() == Some(name))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_parent_and_name() {
        let stat = "1234 (nginx: wor(k)er) S 77 1234 1234 0 -1";
        assert_eq!(
            parse_ppid_and_name(stat),
            Some((77, "nginx: wor(k)er".into()))
        );
        assert_eq!(parse_ppid_and_name("garbage"), None);
    }

    #[test]
    fn finds_a_child_with_its_name_and_command_line() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep starts");
        let found = descendants(std::process::id());
        let line = command_line(child.id());
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            found.contains(&(child.id(), "sleep".to_string())),
            "{found:?}"
        );
        assert_eq!(line.as_deref(), Some("sleep 30"));
    }
}
