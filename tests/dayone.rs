//! End to end: what a partner's operator hits on day one, with hand-made data whose truth is
//! counted by hand in each test (phone formats, forget, `check`, closed pipes, a second node
//! on one state directory, host names, a coordinator restart, a tampered audit log).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

use cleanroom_e2e::{Consortium, OVERLAP, aggregate_job, bins, free_udp_port, overlap_job};

fn node_cli(dir: &Path, args: &[&str]) -> Output {
    cleanroom_e2e::cleanroom_node(dir, args)
}

/// `cleanroom-node forget` of `key` in acme's customers, which must succeed: its output.
fn forget_at_acme(c: &Consortium, key: &str) -> String {
    let out = node_cli(
        c.path(),
        &[
            "forget",
            "--config",
            "acme.toml",
            "--dataset",
            "customers",
            "--key",
            key,
        ],
    );
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    t
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// An agreement allowing overlap on customers by phone, by email and by both.
fn phone_agreement(partner: &str) -> String {
    format!(
        "[[agreement]]\npartner = \"{partner}\"\npurposes = [\"overlap-reporting\"]\n\n\
         [[agreement.allow]]\ncomputation = \"overlap\"\ndataset = \"customers\"\nkeys = [\"phone\", \"email\", \"email+phone\"]\n\n"
    )
}

/// Overlap by `key` between acme and globex: the released count.
fn overlap(c: &Consortium, key: &str) -> u64 {
    let (job, code) = c.submit(&overlap_job("acme,globex", key, "overlap-reporting"));
    assert_eq!(code, Some(0), "{job}");
    assert_eq!(job["state"], "succeeded", "{job}");
    job["intersection"].as_u64().unwrap()
}

/// Phone numbers as real exports write them (trunk prefix in parentheses, national formats,
/// extensions, several countries): overlap by phone equals the count by hand, and `forget
/// --key phone=…` reports the rows it matches and then excludes them.
#[test]
fn phone_formats_overlap_and_forget_by_phone() {
    let mut c = Consortium::new();
    std::fs::create_dir_all(c.path().join("data")).unwrap();
    // Subjects P1..P6 by their E.164 numbers (national numbering plans, see
    // node/testdata/phone_vectors.csv): P1 +442079460018, P2 +14155550123, P3 +49301234567,
    // P4 +14155550199, P5 +61255501234, P6 +33199001234.
    std::fs::write(
        c.path().join("data/acme.csv"),
        "email,phone\n\
         p1@example.com,+44 (0)20 7946 0018\n\
         p1@example.com,+44 20 7946 0018\n\
         p2@example.com,(415) 555-0123\n\
         p3@example.com,+49 (0)30 1234567\n\
         p4@example.com,+1 415 555 0199 ext. 12\n\
         p5@example.com,+61 (0)2 5550 1234\n",
    )
    .unwrap();
    std::fs::write(
        c.path().join("data/globex.csv"),
        "email,phone\n\
         P1@Example.com,+44 20 7946 0018\n\
         p2@example.com,415-555-0123\n\
         p3@example.com,0049 30 1234567\n\
         p4@example.com,+1 (415) 555-0199\n\
         p6@example.com,+33 1 99 00 12 34\n",
    )
    .unwrap();
    c.start_coordinator();
    for (me, other) in [("acme", "globex"), ("globex", "acme")] {
        c.issue_node(me);
        c.write_node_config(me, me, &phone_agreement(other));
        c.start_node(me);
    }
    c.wait_connected(&["acme", "globex"]);
    // Shared: P1, P2, P3, P4 (P5 and P6 are on one side only), by phone, by email and by both.
    assert_eq!(overlap(&c, "phone"), 4);
    assert_eq!(overlap(&c, "email+phone"), 4);

    // A value that matches nothing says so.
    let t = forget_at_acme(&c, "phone=+44 20 7946 0999");
    assert!(t.contains("matches 0 rows in customers"), "{t}");
    assert!(t.contains("warning: no row"), "{t}");
    assert_eq!(overlap(&c, "phone"), 4);

    // P1 is written two ways at acme: both rows match, both are excluded.
    let t = forget_at_acme(&c, "phone=+44 20 7946 0018");
    assert!(t.contains("forgotten: 1 subject"), "{t}");
    assert!(t.contains("matches 2 rows in customers"), "{t}");
    assert!(!t.contains("warning"), "{t}");
    assert_eq!(overlap(&c, "phone"), 3);
    // The subject's rows are excluded whatever the job's key.
    assert_eq!(overlap(&c, "email"), 3);
    assert_eq!(overlap(&c, "email+phone"), 3);
}

/// A node config for `name` in `dir` whose customers dataset is `path` and whose certificate
/// is `cert` (`pki/<cert>.pem`).
fn write_config(dir: &Path, file: &str, name: &str, path: &str, cert: &str) -> String {
    std::fs::write(
        dir.join(file),
        format!(
            "name = \"{name}\"\ncoordinator = \"127.0.0.1:9\"\nlisten = \"127.0.0.1:0\"\nstate_dir = \"state-{file}\"\n\n\
             [tls]\nca = \"pki/ca.pem\"\ncert = \"pki/{cert}.pem\"\nkey = \"pki/{cert}.key\"\n\n\
             [[dataset]]\nname = \"customers\"\npath = \"{path}\"\nconsent = {{ \"overlap-reporting\" = \"consent\" }}\n\n\
             [[dataset.identifier]]\nname = \"email\"\ncolumn = \"email\"\nnormaliser = \"email\"\n\n\
             [[dataset.value]]\ncolumn = \"amount\"\nmin = 0\nmax = 100\n\n{}",
            phone_agreement("globex").replace("keys = [\"phone\", \"email\", \"email+phone\"]", "keys = [\"email\"]")
        ),
    )
    .unwrap();
    file.to_owned()
}

/// `cleanroom-node check` refuses every config `run` refuses at start, with the same reason,
/// and passes the one `run` starts with.
#[test]
fn check_refuses_what_run_refuses() {
    let c = Consortium::new();
    let dir = c.path();
    c.issue_node("acme");
    c.issue_node("globex");
    std::fs::create_dir_all(dir.join("data/a-directory.csv")).unwrap();
    std::fs::write(dir.join("data/empty.csv"), "").unwrap();
    std::fs::write(
        dir.join("data/good.csv"),
        "email,amount,consent\na@b.c,1,yes\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("data/no-id.csv"),
        "mail,amount,consent\na@b.c,1,yes\n",
    )
    .unwrap();
    std::fs::write(dir.join("data/no-value.csv"), "email,consent\na@b.c,yes\n").unwrap();
    std::fs::write(dir.join("data/no-consent.csv"), "email,amount\na@b.c,1\n").unwrap();
    let cases = [
        (
            "missing.toml",
            "data/missing.csv",
            "node-acme",
            "cannot open",
        ),
        (
            "dir.toml",
            "data/a-directory.csv",
            "node-acme",
            "a-directory.csv",
        ),
        (
            "empty.toml",
            "data/empty.csv",
            "node-acme",
            "identifier column 'email'",
        ),
        (
            "noid.toml",
            "data/no-id.csv",
            "node-acme",
            "identifier column 'email'",
        ),
        (
            "novalue.toml",
            "data/no-value.csv",
            "node-acme",
            "value column 'amount'",
        ),
        (
            "noconsent.toml",
            "data/no-consent.csv",
            "node-acme",
            "consent column 'consent'",
        ),
        ("other.toml", "data/good.csv", "node-globex", "globex"),
        ("analyst.toml", "data/good.csv", "analyst-alice", "alice"),
    ];
    let run = |cfg: &str| {
        // `run` stops at once on the closed stdin if it passes its start-up checks.
        Command::new(&bins().1)
            .args(["run", "--config", cfg, "--stop-on-stdin-eof"])
            .current_dir(dir)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    for (file, path, cert, wording) in cases {
        let cfg = write_config(dir, file, "acme", path, cert);
        let out = node_cli(dir, &["check", "--config", &cfg]);
        let t = text(&out);
        assert!(!out.status.success(), "check passed {file}: {t}");
        assert!(t.contains(wording), "{file}: check said {t}");
        let started = run(&cfg);
        assert!(
            !started.status.success(),
            "run started with {file}: {}",
            text(&started)
        );
        assert!(
            text(&started).contains(wording),
            "{file}: run said {}",
            text(&started)
        );
    }
    let cfg = write_config(dir, "good.toml", "acme", "data/good.csv", "node-acme");
    let out = node_cli(dir, &["check", "--config", &cfg]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("ok (node 'acme'"), "{}", text(&out));
    let started = run(&cfg);
    assert!(started.status.success(), "{}", text(&started));
}

/// Runs `bin ARGS` with its standard output a pipe whose reader is already gone: the first
/// write fails with EPIPE. Returns the exit code and standard error.
fn with_closed_stdout(bin: &Path, dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(bin)
        .args(args)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `cleanroom job list | head -2`, and every other command of both binaries whose output
/// nobody reads, exits 0 quietly: no panic, no exit code 101.
#[test]
fn a_closed_pipe_ends_every_command_quietly() {
    let (c, _) = Consortium::open_pair(50, 0.5, 3);
    let mut jobs = Vec::new();
    for _ in 0..3 {
        let (job, _) = c.submit(&OVERLAP);
        jobs.push(job["job_id"].as_str().unwrap().to_owned());
    }
    let analyst = c.analyst_args().join(" ");
    // As a user types it: head prints two lines, and the pipeline's status is cleanroom's.
    let out = Command::new("bash")
        .args([
            "-c",
            &format!(
                "set -o pipefail; {} job list {analyst} | head -2",
                bins().0.display()
            ),
        ])
        .current_dir(c.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2);
    assert!(!text(&out).contains("panicked"), "{}", text(&out));

    let with = |args: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        v.extend(c.analyst_args());
        v
    };
    let job = jobs[0].as_str();
    let analyst_cmds = [
        with(&["job", "list"]),
        with(&["job", "list", "--format", "json"]),
        with(&["job", "list", "--format", "csv"]),
        with(&["job", "status", job]),
        with(&["job", "status", job, "--format", "json"]),
        with(&["nodes"]),
        with(&["nodes", "--format", "csv"]),
        with(&["schedule", "list"]),
    ];
    let other_cmds: Vec<Vec<String>> = [
        vec!["--help"],
        vec!["--version"],
        vec!["pki", "init", "--dir", "pki-closed"],
        vec![
            "synth",
            "--out",
            "data-closed",
            "--partners",
            "a,b",
            "--rows",
            "10",
        ],
    ]
    .iter()
    .map(|v| v.iter().map(|s| s.to_string()).collect())
    .collect();
    for args in analyst_cmds.iter().chain(&other_cmds) {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, stderr) = with_closed_stdout(&bins().0, c.path(), &args);
        assert_eq!(code, Some(0), "cleanroom {args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "cleanroom {args:?}: {stderr}");
    }
    let node_cmds: [&[&str]; 9] = [
        &["--help"],
        &["check", "--config", "acme.toml"],
        &["policy", "check", "acme.toml"],
        &["audit", "show", "--config", "acme.toml"],
        &["audit", "show", "--config", "acme.toml", "--json"],
        &["audit", "verify", "--config", "acme.toml"],
        &["budget", "--config", "acme.toml", "--format", "json"],
        &["transparency", "--config", "acme.toml"],
        &["purge", "--config", "acme.toml", "--older-than-days", "30"],
    ];
    for args in node_cmds {
        let (code, stderr) = with_closed_stdout(&bins().1, c.path(), args);
        assert_eq!(code, Some(0), "cleanroom-node {args:?}: {stderr}");
        assert!(
            !stderr.contains("panicked"),
            "cleanroom-node {args:?}: {stderr}"
        );
    }
}

/// A second `run` on a state directory a running node holds exits non-zero at once, naming
/// the holder's pid; the first node stays registered and keeps serving jobs.
#[test]
fn a_second_node_on_one_state_dir_is_refused() {
    let (c, _) = Consortium::open_pair(50, 0.5, 4);
    let pid = c.node("acme").pid();
    let started = std::time::Instant::now();
    let out = Command::new(&bins().1)
        .args(["run", "--config", "acme.toml", "--stop-on-stdin-eof"])
        .current_dir(c.path())
        .stdin(std::process::Stdio::piped())
        .output()
        .unwrap();
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "{t}"
    );
    assert!(t.contains(&format!("pid {pid}")), "{t}");
    assert!(t.contains("state-acme"), "{t}");
    let check = node_cli(c.path(), &["check", "--config", "acme.toml"]);
    assert!(check.status.success(), "{}", text(&check));
    assert!(
        text(&check).contains(&format!("pid {pid}")),
        "{}",
        text(&check)
    );
    c.wait_connected(&["acme", "globex"]);
    let (job, _) = c.submit(&OVERLAP);
    assert_eq!(job["state"], "succeeded", "{job}");
}

/// A UDP port free on loopback now.
/// Host names everywhere an address is written (`coordinator = "localhost:PORT"`, `advertise =
/// "localhost:PORT"`, `CLEANROOM_COORDINATOR=localhost:PORT`); then the coordinator is killed
/// and restarted on the same address: the nodes log a lost connection (not a protocol
/// violation) and register again within the reconnect back-off (at most 5 s).
#[test]
fn host_names_and_a_coordinator_restart() {
    let mut c = Consortium::new();
    let truth = c.synth("acme,globex", 300, 0.5, 6);
    let expected = truth["pairwise_overlap"]["acme,globex"].as_u64().unwrap();
    let port = free_udp_port();
    let listen = format!("127.0.0.1:{port}");
    c.start_coordinator_at(&listen, "coordinator");
    let mut advertised = Vec::new();
    for (me, other) in [("acme", "globex"), ("globex", "acme")] {
        c.issue_node(me);
        let cfg = c.write_node_config(me, me, &cleanroom_e2e::open_agreement(other));
        let data = free_udp_port();
        let text = std::fs::read_to_string(&cfg)
            .unwrap()
            .replace(
                &format!("coordinator = \"{listen}\""),
                &format!("coordinator = \"localhost:{port}\""),
            )
            .replace(
                "listen = \"127.0.0.1:0\"",
                &format!("listen = \"127.0.0.1:{data}\"\nadvertise = \"localhost:{data}\""),
            );
        assert!(text.contains("localhost:"), "{text}");
        std::fs::write(&cfg, text).unwrap();
        advertised.push(format!("localhost:{data}"));
        c.start_node(me);
    }
    c.wait_connected(&["acme", "globex"]);
    // The analyst names the coordinator by host name too.
    let dir = c.path().to_owned();
    let analyst = |args: &[&str]| {
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        all.extend(
            [
                "--ca",
                "pki/ca.pem",
                "--cert",
                "pki/analyst-alice.pem",
                "--key",
                "pki/analyst-alice.key",
            ]
            .map(String::from),
        );
        let out = Command::new(&bins().0)
            .args(&all)
            .current_dir(&dir)
            .env("CLEANROOM_COORDINATOR", format!("localhost:{port}"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{all:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let nodes = analyst(&["nodes", "--format", "json"]);
    for a in &advertised {
        assert!(nodes.contains(a), "{nodes}");
    }
    let overlap_job = || -> serde_json::Value {
        let out = analyst(
            &[
                &["job", "submit"][..],
                &OVERLAP,
                &["--wait", "--timeout", "120", "--format", "json"],
            ]
            .concat(),
        );
        serde_json::from_str(&out).unwrap()
    };
    // The initiator dials the responder at its advertised host name.
    let job = overlap_job();
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["intersection"].as_u64(), Some(expected), "{job}");

    // Crash: SIGKILL, no goodbye to the nodes. Restart on the same address after a pause.
    c.coordinator.as_mut().unwrap().kill();
    std::thread::sleep(std::time::Duration::from_secs(2));
    c.start_coordinator_at(&listen, "coordinator-restarted");
    let restarted = std::time::Instant::now();
    c.wait_connected(&["acme", "globex"]);
    let took = restarted.elapsed();
    eprintln!("nodes registered again {took:?} after the restart");
    assert!(
        took < std::time::Duration::from_secs(6),
        "nodes took {took:?} to register again"
    );
    for n in ["acme", "globex"] {
        let log = c.node(n).log_text();
        assert!(
            !log.contains("protocol violation by coordinator"),
            "{n}: {log}"
        );
        assert!(
            log.contains("lost the connection to the coordinator"),
            "{n}: {log}"
        );
    }
    let job = overlap_job();
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["intersection"].as_u64(), Some(expected), "{job}");
}

/// The audit log of a running node is altered (one digit of its last entry, the length kept):
/// the node notices before its next append and refuses that job and every later one, with a
/// reason that says why; `audit show` marks the altered entry.
#[test]
fn a_tampered_audit_log_of_a_running_node_refuses_jobs() {
    let (c, _) = Consortium::open_pair(50, 0.5, 8);
    let job = || c.submit(&OVERLAP).0;
    assert_eq!(job()["state"], "succeeded");
    let log = c.path().join("state-acme/audit.log");
    let original = std::fs::read_to_string(&log).unwrap();
    let cut = original[..original.len() - 1].rfind('\n').unwrap() + 1;
    let last = &original[cut..];
    let at = last.find("\"at_ms\":").unwrap() + "\"at_ms\":".len() + 3;
    let digit = last.as_bytes()[at];
    let other = if digit == b'1' { '2' } else { '1' };
    let tampered = format!(
        "{}{}{other}{}",
        &original[..cut],
        &last[..at],
        &last[at + 1..]
    );
    assert_eq!(tampered.len(), original.len());
    // Written in place (same file), as an editor that keeps the inode would.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&log)
        .unwrap()
        .write_all_at_start(tampered.as_bytes());
    for _ in 0..2 {
        let j = job();
        assert_eq!(j["state"], "vetoed", "{j}");
        let reason = j["reason"].as_str().unwrap_or_default().to_owned() + &j.to_string();
        assert!(
            reason.contains("node 'acme' refuses every job: its audit log does not verify"),
            "{j}"
        );
        assert!(reason.contains("was changed"), "{j}");
    }
    // Nothing was appended after the altered entry.
    assert_eq!(std::fs::read_to_string(&log).unwrap(), tampered);
    let out = node_cli(c.path(), &["audit", "show", "--config", "acme.toml"]);
    let t = text(&out);
    assert!(t.contains("TAMPERED"), "{t}");
    assert!(t.contains("does not verify"), "{t}");
}

trait WriteAtStart {
    fn write_all_at_start(self, bytes: &[u8]);
}

impl WriteAtStart for std::fs::File {
    fn write_all_at_start(mut self, bytes: &[u8]) {
        use std::io::{Seek, Write};
        self.rewind().unwrap();
        self.write_all(bytes).unwrap();
        self.sync_all().unwrap();
    }
}

/// The smaller things a new user tripped over, end to end: a dataset the node does not have,
/// composite keys written both ways, the last time a node that left was seen, histories with
/// times, budget JSON without "-0.0", and policy check's expiry warnings and aggregate lines.
#[test]
fn small_things_a_new_user_trips_over() {
    let (mut c, _) = Consortium::with_coordinator("acme,globex", 120, 0.5, 9);
    let agreement = |partner: &str| {
        format!(
            "[[agreement]]\npartner = \"{partner}\"\npurposes = [\"overlap-reporting\"]\nexpires = \"2099-12-31\"\n\n\
             [[agreement.allow]]\ncomputation = \"overlap\"\ndataset = \"customers\"\nkeys = [\"email\", \"email,phone\"]\n\n"
        )
    };
    for (me, other) in [("acme", "globex"), ("globex", "acme")] {
        c.issue_node(me);
        c.write_node_config(me, me, &agreement(other));
        c.start_node(me);
    }
    c.wait_connected(&["acme", "globex"]);
    let run = |on: &str, dataset: &str| {
        c.submit(&[
            "overlap",
            "--between",
            "acme,globex",
            "--dataset",
            dataset,
            "--on",
            on,
            "--purpose",
            "overlap-reporting",
        ])
        .0
    };
    // A dataset neither node has.
    let j = run("email", "orders");
    assert_eq!(j["state"], "vetoed", "{j}");
    assert!(j.to_string().contains("has no dataset 'orders'"), "{j}");
    assert!(!j.to_string().contains("does not allow"), "{j}");
    // A composite key, written with '+' or ',' (the config wrote it with ','); both run.
    for on in ["email+phone", "email,phone"] {
        let j = run(on, "customers");
        assert_eq!(j["state"], "succeeded", "--on {on}: {j}");
    }
    // Histories print times.
    let id = run("email", "customers")["job_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut args = vec!["job".to_owned(), "status".into(), id];
    args.extend(c.analyst_args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let status = cleanroom_e2e::cleanroom_ok(c.path(), &args);
    let history = &status[status.find("history").unwrap()..];
    assert!(
        history.lines().skip(1).all(|l| l.trim().starts_with("20")),
        "{history}"
    );
    // Budget JSON: a partner and purpose with nothing spent shows 0, not -0.0.
    std::fs::write(
        c.path().join("budget.toml"),
        std::fs::read_to_string(c.path().join("acme.toml")).unwrap()
            + "[[agreement]]\npartner = \"initech\"\npurposes = [\"audit\"]\nbudget_per_purpose = { epsilon_per_period = 1.0, period = \"week\" }\n\
               [[agreement.allow]]\ncomputation = \"overlap\"\ndataset = \"customers\"\nkeys = [\"email\"]\n",
    )
    .unwrap();
    let out = node_cli(
        c.path(),
        &["budget", "--config", "budget.toml", "--format", "json"],
    );
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("\"initech\""), "{t}");
    assert!(!t.contains("-0.0") && !t.contains(": -0"), "{t}");
    // policy check: an expired agreement and one expiring soon are warned of; an aggregate
    // entry says what it groups by.
    let soon = time::OffsetDateTime::now_utc().date() + time::Duration::days(10);
    std::fs::write(
        c.path().join("warn.toml"),
        std::fs::read_to_string(c.path().join("acme.toml"))
            .unwrap()
            .replace("expires = \"2099-12-31\"", &format!("expires = \"{soon}\""))
            + "[[agreement]]\npartner = \"initech\"\npurposes = [\"old\"]\nexpires = \"2020-01-31\"\n\
               [[agreement.allow]]\ncomputation = \"aggregate\"\ndataset = \"customers\"\ngroup_by = [\"phone\"]\n",
    )
    .unwrap();
    let out = node_cli(c.path(), &["policy", "check", "warn.toml"]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains(&format!("agreement with globex expires {soon}")) && t.contains("in 10 days"),
        "{t}"
    );
    assert!(
        t.contains("agreement with initech expired 2020-01-31"),
        "{t}"
    );
    assert!(t.contains("allow aggregate on customers by phone\n"), "{t}");
    // LAST SEEN: a node that left was last seen when it left, not when it registered.
    let registered = c.nodes_json();
    let seen = |nodes: &serde_json::Value| {
        nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == "globex")
            .unwrap()["last_seen_ms"]
            .as_i64()
            .unwrap()
    };
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let before_stop = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    c.nodes
        .iter_mut()
        .find(|p| p.name == "globex")
        .unwrap()
        .stop();
    let nodes = c.wait_disconnected("globex", std::time::Duration::from_secs(20));
    assert!(
        seen(&nodes) >= before_stop,
        "last seen {} is before the stop at {before_stop} (first seen {})",
        seen(&nodes),
        seen(&registered)
    );
}

/// An aggregate over hand-made tables where some amounts are not numbers: the totals are those
/// of the numeric rows, and each node's own audit log counts the rows it rejected (the
/// coordinator is not told).
#[test]
fn aggregate_rows_with_non_numeric_values_are_counted_in_the_nodes_audit() {
    let mut c = Consortium::new();
    std::fs::create_dir_all(c.path().join("data")).unwrap();
    let tables = [
        (
            "acme",
            "category,amount\nfashion,100\nfashion,n/a\nhome,250\nhome,12.50\nhome,\n",
            3,
        ),
        ("globex", "category,amount\nfashion,40\nhome,60\n", 0),
        ("initech", "category,amount\nfashion,1\nfashion,one\n", 1),
    ];
    c.start_coordinator();
    let names = ["acme", "globex", "initech"];
    for (name, csv, _) in tables {
        std::fs::write(c.path().join(format!("data/{name}-cb.csv")), csv).unwrap();
        c.issue_node(name);
        let mut cfg = format!(
            "[[dataset]]\nname = \"chargebacks\"\npath = \"data/{name}-cb.csv\"\n\n\
             [[dataset.value]]\ncolumn = \"amount\"\nmin = 0\nmax = 100000\n\n"
        );
        for other in names.iter().filter(|o| **o != name) {
            cfg.push_str(&format!(
                "[[agreement]]\npartner = \"{other}\"\npurposes = [\"fraud-benchmark\"]\n\n\
                 [[agreement.allow]]\ncomputation = \"aggregate\"\ndataset = \"chargebacks\"\n\
                 group_by = [\"category\"]\nvalue_columns = [{{ column = \"amount\", min = 0, max = 100000 }}]\nmin_result = 1\n\n"
            ));
        }
        c.write_node_toml(name, &cfg);
        c.start_node(name);
    }
    c.wait_connected(&names);
    let (job, _) = c.submit(
        &[
            &aggregate_job("acme,globex,initech", "fashion,home")[..],
            &["--count"],
        ]
        .concat(),
    );
    assert_eq!(job["state"], "succeeded", "{job}");
    // By hand: fashion = 100 + 40 + 1 over 3 rows; home = 250 + 60 over 2 rows.
    let text_of = job.to_string();
    for (group, count, sum) in [("fashion", 3, 141), ("home", 2, 310)] {
        let g = job["result"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["group"] == group)
            .unwrap_or_else(|| panic!("{text_of}"));
        assert_eq!(g["values"]["count"].as_i64(), Some(count), "{g}");
        assert_eq!(g["values"]["amount"].as_i64(), Some(sum), "{g}");
    }
    for (name, _, rejected) in tables {
        let out = node_cli(
            c.path(),
            &[
                "audit",
                "show",
                "--config",
                &format!("{name}.toml"),
                "--json",
            ],
        );
        let access: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|e| e["event"]["kind"] == "Access" || e["event"]["Access"].is_object())
            .collect();
        assert_eq!(access.len(), 1, "{name}: {}", text(&out));
        let a = access[0].to_string();
        assert!(
            a.contains(&format!("\"rows_rejected\":{rejected}")),
            "{name}: {a}"
        );
    }
}

/// CSV as real exports break it: a row with an extra field and a quote that is never closed.
/// The malformed rows are rejected, not read by position; the count equals the one by hand;
/// acme's audit entry counts the rejections by reason with their lines and no value; `dataset
/// preview` shows the same before any job, and the normalised values it prints on request appear
/// in no log or state file.
#[test]
fn malformed_csv_rows_are_rejected_audited_by_line_and_previewed() {
    let mut c = Consortium::new();
    std::fs::create_dir_all(c.path().join("data")).unwrap();
    // acme: line 3 has an extra field (read by position it would have joined on 'x@shift.io');
    // line 5 opens a quote in the email closed on line 6, swallowing p4's row into one field:
    // line 5 is rejected, and line 6, read again on its own, for the quote it closes.
    std::fs::write(
        c.path().join("data/acme.csv"),
        "email,phone\n\
         p1@example.com,+1 415 555 0101\n\
         x@shift.io,p2@example.com,+1 415 555 0102\n\
         p3@example.com,+1 415 555 0103\n\
         \"p5@example.com,+1 415 555 0105\n\
         p4@example.com\",+1 415 555 0104\n\
         p6@example.com,+1 415 555 0106\n",
    )
    .unwrap();
    std::fs::write(
        c.path().join("data/globex.csv"),
        "email,phone\n\
         p1@example.com,+1 415 555 0101\n\
         p2@example.com,+1 415 555 0102\n\
         x@shift.io,+1 415 555 0199\n\
         p4@example.com,+1 415 555 0104\n\
         p5@example.com,+1 415 555 0105\n\
         p6@example.com,+1 415 555 0106\n",
    )
    .unwrap();

    // Before any job: the dry run.
    c.start_coordinator();
    for (me, other) in [("acme", "globex"), ("globex", "acme")] {
        c.issue_node(me);
        c.write_node_config(me, me, &phone_agreement(other));
    }
    let out = node_cli(
        c.path(),
        &[
            "dataset",
            "preview",
            "--config",
            "acme.toml",
            "--dataset",
            "customers",
            "--show-normalised",
            "2",
        ],
    );
    let preview = text(&out);
    assert!(out.status.success(), "{preview}");
    // Per identifier: 6 records read (the open quote costs line 5 only), 3 rejected, 3
    // distinct.
    assert!(
        preview
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["email", "6", "3", "0", "0", "3"]),
        "{preview}"
    );
    assert!(preview.contains("field count"), "{preview}");
    assert!(preview.contains("line break in a field"), "{preview}");
    assert!(preview.contains("quote in a field"), "{preview}");
    assert!(
        preview.contains("line 3") && preview.contains("line 5") && preview.contains("line 6"),
        "{preview}"
    );
    assert!(preview.contains("p1@example.com"), "{preview}");

    for me in ["acme", "globex"] {
        c.start_node(me);
    }
    c.wait_connected(&["acme", "globex"]);
    // Shared by hand: p1 and p6. globex lacks p3; p2, p4 and p5 sit in acme's malformed rows;
    // x@shift.io is in acme's only as a shifted field, which is never read.
    assert_eq!(overlap(&c, "email"), 2);

    let out = node_cli(
        c.path(),
        &["audit", "show", "--config", "acme.toml", "--json"],
    );
    let access: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["event"]["kind"] == "Access")
        .collect();
    assert_eq!(access.len(), 1, "{}", text(&out));
    let rejected = &access[0]["event"]["rejected"];
    assert_eq!(rejected["by_reason"]["field count"], 1, "{rejected}");
    assert_eq!(
        rejected["by_reason"]["line break in a field"], 1,
        "{rejected}"
    );
    assert_eq!(rejected["by_reason"]["quote in a field"], 1, "{rejected}");
    let lines: Vec<u64> = rejected["first"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["line"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, [3, 5, 6], "{rejected}");

    // No identifier in the node's log, audit log or state files — not even the ones the
    // preview printed.
    let mut files = vec![c.path().join("logs/acme.log")];
    for entry in walk(&c.path().join("state-acme")) {
        files.push(entry);
    }
    for file in files {
        let Ok(bytes) = std::fs::read(&file) else {
            continue;
        };
        let body = String::from_utf8_lossy(&bytes);
        for id in ["p1@example.com", "p2@example.com", "x@shift.io", "555 0104"] {
            assert!(!body.contains(id), "{} holds {id}", file.display());
        }
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
