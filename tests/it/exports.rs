//! The exports, each read by its real consumer and checked against the JSON
//! report of the same run: the pprof profile by `go tool pprof` (Debian's
//! golang-go), the folded stacks line by line, the SVG flame graph rendered
//! by a headless Chromium, its script driven through the URL.
use std::{collections::BTreeMap, fs, path::Path, process::Command};

use memtrace_tests::*;
use serde_json::Value;

/// One run of leaks.c writing all four formats.
struct Exports {
    json: Value,
    pprof: std::path::PathBuf,
    folded: String,
    svg: std::path::PathBuf,
}

fn run_all_formats(extra: &[&str]) -> Exports {
    let exe = build_fixture("leaks", Variant::FramePointers);
    let path = |ext: &str| unique_path(ext);
    let (json, pprof, folded, svg) = (path("json"), path("pb.gz"), path("folded"), path("svg"));
    let mut c = memtrace_command();
    c.args(extra);
    for (f, p) in [
        ("json", &json),
        ("pprof", &pprof),
        ("folded", &folded),
        ("svg", &svg),
    ] {
        c.args(["-f", f, "-o"]).arg(p);
    }
    c.arg("--").arg(&exe).args(["launch", "0"]);
    let out = run_memtrace(c);
    assert_eq!(out.code(), Some(0), "stderr:\n{}", out.stderr);
    for p in [&json, &pprof, &folded, &svg] {
        assert!(
            out.stderr
                .contains(&format!("report written to {}", p.display())),
            "{}",
            out.stderr
        );
    }
    let json_text = fs::read_to_string(&json).unwrap();
    let _ = fs::remove_file(&json);
    let folded_text = fs::read_to_string(&folded).unwrap();
    let _ = fs::remove_file(&folded);
    Exports {
        json: serde_json::from_str(&json_text).unwrap(),
        pprof,
        folded: folded_text,
        svg,
    }
}

/// A site's stack as `function:line` frames, innermost first (inlined
/// frames included, as pprof's location lines are).
type Stack = Vec<String>;

/// Every site of the JSON report, freed ones too, by stack.
fn json_sites(json: &Value) -> BTreeMap<Stack, [u64; 4]> {
    let mut sites = BTreeMap::new();
    let freed = json["freed_sites"].as_array().unwrap();
    for s in json["sites"].as_array().unwrap().iter().chain(freed) {
        let stack: Stack = s["frames"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                format!(
                    "{}:{}",
                    f["function"].as_str().unwrap_or("?"),
                    f["line"].as_u64().unwrap_or(0)
                )
            })
            .collect();
        let v = |k: &str| s[k].as_u64().unwrap();
        let prev = sites.insert(
            stack,
            [
                v("alloc_calls"),
                v("alloc_bytes"),
                v("outstanding_blocks"),
                v("outstanding_bytes"),
            ],
        );
        assert!(prev.is_none(), "two JSON sites with one stack");
    }
    sites
}

fn go_pprof(args: &[&str], profile: &Path) -> String {
    let home = scratch_dir().join("go-home");
    fs::create_dir_all(&home).unwrap();
    let out = Command::new("go")
        .args(["tool", "pprof"])
        .args(args)
        .arg(profile)
        .env("HOME", &home)
        .env("GOCACHE", home.join("cache"))
        .output()
        .expect("go (Debian's golang-go; cargo xtask test installs it)");
    assert!(
        out.status.success(),
        "go tool pprof {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The samples of `go tool pprof -raw`: each stack (its locations' lines,
/// innermost first) with its four values.
fn pprof_samples(raw: &str) -> BTreeMap<Stack, [u64; 4]> {
    let section = |name: &str| -> Vec<&str> {
        raw.lines()
            .skip_while(|l| l.trim() != name)
            .skip(1)
            .take_while(|l| !matches!(l.trim(), "Samples:" | "Locations" | "Mappings"))
            .collect()
    };
    // Locations: `  ID: 0xADDR M=N function file:line s=0`, then one line per
    // function it inlines into: `         function file:line s=0`.
    let mut locations: BTreeMap<u64, Stack> = BTreeMap::new();
    let mut current = 0;
    for l in section("Locations") {
        let (rest, id) = match l.trim_start().split_once(": 0x") {
            Some((id, rest)) if id.parse::<u64>().is_ok() => {
                let rest = rest.split_once(' ').map_or("", |(_, r)| r);
                let rest = rest.split_once(' ').map_or("", |(_, r)| r); // M=N
                (rest, Some(id.parse::<u64>().unwrap()))
            }
            _ => (l.trim(), None),
        };
        if let Some(id) = id {
            current = id;
            locations.insert(id, Vec::new());
        }
        let parts: Vec<&str> = rest.split_whitespace().collect();
        if parts.len() >= 3 {
            let line = parts[parts.len() - 2].rsplit(':').next().unwrap();
            let func = parts[..parts.len() - 2].join(" ");
            locations
                .get_mut(&current)
                .unwrap()
                .push(format!("{func}:{line}"));
        }
    }
    let mut samples = BTreeMap::new();
    for l in section("Samples:").iter().skip(1) {
        let Some((values, locs)) = l.split_once(':') else {
            continue;
        };
        let Ok(values) = values
            .split_whitespace()
            .map(str::parse::<u64>)
            .collect::<Result<Vec<u64>, _>>()
        else {
            continue; // a label line
        };
        let stack: Stack = locs
            .split_whitespace()
            .flat_map(|id| locations[&id.parse::<u64>().unwrap()].clone())
            .collect();
        samples.insert(stack, [values[0], values[1], values[2], values[3]]);
    }
    samples
}

#[test]
fn pprof_is_read_by_go_tool_pprof_and_agrees_with_the_json() {
    require_root();
    require_memtrace();
    let e = run_all_formats(&[]);
    let want = json_sites(&e.json);
    assert!(want.len() >= 15, "leaks.c has 20 sites: {want:#?}");
    // The churn sites: every block freed, every allocation in alloc_space.
    assert!(want.values().any(|v| v[3] == 0 && v[0] > 1000), "{want:#?}");
    let raw = go_pprof(&["-raw"], &e.pprof);
    assert!(
        raw.contains("inuse_space/bytes[dflt]"),
        "inuse_space is the default:\n{raw}"
    );
    assert_eq!(pprof_samples(&raw), want, "go tool pprof -raw:\n{raw}");
    // The totals -top prints, in bytes.
    let total: u64 = want.values().map(|v| v[3]).sum();
    let top = go_pprof(&["-top", "-unit=B"], &e.pprof);
    assert!(
        top.contains(&format!("Total samples = {total}B")),
        "want {total}B:\n{top}"
    );
    let alloc: u64 = want.values().map(|v| v[1]).sum();
    let top = go_pprof(&["-top", "-unit=B", "-sample_index=alloc_space"], &e.pprof);
    assert!(top.contains(&format!("Total samples = {alloc}B")), "{top}");
    // The inlined malloc (leaks.c `inl_malloc`) is a line of its caller's location.
    let traces = go_pprof(&["-traces"], &e.pprof);
    let inl = traces
        .lines()
        .position(|l| l.contains("(inline)"))
        .unwrap_or_else(|| panic!("no inlined frame:\n{traces}"));
    assert!(
        traces.lines().nth(inl + 1).unwrap().contains("with_inline"),
        "{traces}"
    );
    // The executable's mapping carries its build id.
    let exe = build_fixture("leaks", Variant::FramePointers);
    let id = Command::new("readelf")
        .arg("-n")
        .arg(&exe)
        .output()
        .unwrap();
    let id = String::from_utf8_lossy(&id.stdout);
    let id = id
        .lines()
        .find_map(|l| l.trim().strip_prefix("Build ID: "))
        .expect("gcc writes a build id");
    assert!(
        raw.lines().any(|l| l.contains("/leaks ") && l.contains(id)),
        "mapping with build id {id}:\n{raw}"
    );
    let _ = fs::remove_file(&e.pprof);
    let _ = fs::remove_file(&e.svg);
}

#[test]
fn pprof_carries_the_estimates_in_sampled_mode() {
    require_root();
    require_memtrace();
    let e = run_all_formats(&["--sample-bytes", "4KiB"]);
    assert_eq!(e.json["sampling"]["mode"], "bytes");
    let raw = go_pprof(&["-raw"], &e.pprof);
    assert!(raw.contains("Period: 4096"), "{raw}");
    assert_eq!(pprof_samples(&raw), json_sites(&e.json), "{raw}");
    let _ = fs::remove_file(&e.pprof);
    let _ = fs::remove_file(&e.svg);
}

#[test]
fn folded_stacks_hold_each_sites_bytes() {
    require_root();
    require_memtrace();
    let e = run_all_formats(&[]);
    let mut want: BTreeMap<String, u64> = BTreeMap::new();
    // A flame graph of bytes has no room for malloc(0)'s site.
    let sites = e.json["sites"].as_array().unwrap();
    assert!(sites.iter().any(|s| s["outstanding_bytes"] == 0));
    for s in sites.iter().filter(|s| s["outstanding_bytes"] != 0) {
        let mut names: Vec<&str> = s["frames"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["function"].as_str().unwrap())
            .collect();
        names.reverse();
        *want.entry(names.join(";")).or_default() += s["outstanding_bytes"].as_u64().unwrap();
    }
    let got: BTreeMap<String, u64> = e
        .folded
        .lines()
        .map(|l| {
            let (stack, bytes) = l.rsplit_once(' ').unwrap();
            (stack.to_string(), bytes.parse().unwrap())
        })
        .collect();
    assert_eq!(got, want, "folded:\n{}", e.folded);
    assert!(
        got.keys()
            .any(|k| k.ends_with("main;run_leaks;lvl1;lvl2;lvl3"))
    );
    let _ = fs::remove_file(&e.pprof);
    let _ = fs::remove_file(&e.svg);
}

/// The SVG's DOM after Chromium ran its script with `query`.
fn chromium_dom(svg: &Path, query: &str) -> String {
    let out = Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--dump-dom"])
        .arg(format!("file://{}?{query}", svg.display()))
        .output()
        .expect("chromium (Debian's; cargo xtask test installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn attr<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let start = text.find(&format!("{name}=\""))? + name.len() + 2;
    text[start..].split('"').next()
}

#[test]
fn svg_flame_graph_zooms_and_searches_in_a_browser() {
    require_root();
    require_memtrace();
    let e = run_all_formats(&[]);
    let svg = fs::read_to_string(&e.svg).unwrap();
    let sites = e.json["sites"].as_array().unwrap();
    let total: u64 = sites
        .iter()
        .map(|s| s["outstanding_bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(
        attr(&svg, "data-total-bytes"),
        Some(total.to_string().as_str())
    );
    // Search for one leak's function: the browser sums the bytes of the
    // sites whose stacks hold it.
    let target = "leak_realloc";
    let want: u64 = sites
        .iter()
        .filter(|s| {
            s["frames"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["function"].as_str().is_some_and(|n| n.contains(target)))
        })
        .map(|s| s["outstanding_bytes"].as_u64().unwrap())
        .sum();
    assert!(want > 0);
    // Zoom into lvl1: it fills the width, and what is beside it is hidden.
    let lvl1 = svg
        .split("<g class=\"f\" ")
        .find(|g| g.contains("data-name=\"lvl1\""))
        .expect("a frame for lvl1");
    let id = attr(lvl1, "id").unwrap();
    let dom = chromium_dom(&e.svg, &format!("s={target}&x={id}"));
    assert_eq!(
        attr(&dom, "data-ready"),
        Some("1"),
        "the script ran:\n{dom}"
    );
    assert_eq!(
        attr(&dom, "data-matched-bytes"),
        Some(want.to_string().as_str()),
        "{dom}"
    );
    let pct = format!(
        "Matched: {:.1}% ({want} bytes)",
        100.0 * want as f64 / total as f64
    );
    assert!(dom.contains(&pct), "want `{pct}`");
    assert_eq!(attr(&dom, "data-zoomed"), Some(id));
    let zoomed = dom
        .split("<g class=\"f")
        .find(|g| g.contains(&format!("id=\"{id}\"")))
        .unwrap();
    let rect = &zoomed[zoomed.find("<rect").unwrap()..];
    assert_eq!(attr(rect, "width"), Some("1180.000"), "{zoomed}");
    let hidden = dom.matches("class=\"f hide").count();
    assert!(hidden > 0, "frames beside lvl1 are hidden");
    let _ = fs::remove_file(&e.pprof);
    let _ = fs::remove_file(&e.svg);
}

/// A port nothing listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A process that is killed and reaped when dropped.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `GET url` over plain HTTP/1.0 with std: the body, if the status is 200.
fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200")
        .then(|| body.to_string())
        .or_else(|| head.starts_with("HTTP/1.0 200").then(|| body.to_string()))
}

/// The value of a PromQL instant query with one result, polled until it
/// equals `want` (a scrape comes every second, the first after about 6 s).
fn prometheus_until(prom: &str, query: &str, want: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
    let mut last = String::new();
    while std::time::Instant::now() < deadline {
        let q: String = query
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        if let Some(body) = http_get(prom, &format!("/api/v1/query?query={q}")) {
            let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
            if let Some(value) = v["data"]["result"][0]["value"][1].as_str() {
                last = value.to_string();
                if last == want {
                    return last;
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    panic!("prometheus: `{query}` = {last:?}, want {want}");
}

/// Debian's Prometheus scraping `listen` every second, in a directory of
/// its own; its address.
fn start_prometheus(listen: &str, port: u16) -> (Reaped, String) {
    let dir = scratch_dir().join(format!("prometheus-{port}"));
    fs::create_dir_all(&dir).unwrap();
    let config = dir.join("prometheus.yml");
    fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  \
             - job_name: memtrace\n    static_configs:\n      - targets: ['{listen}']\n"
        ),
    )
    .unwrap();
    let prom_addr = format!("127.0.0.1:{}", free_port());
    let prom = Reaped(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={prom_addr}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("prometheus (Debian's; cargo xtask test installs it)"),
    );
    (prom, prom_addr)
}

/// The value of the sample of `/metrics` at `listen` whose line starts
/// with `name{` and holds `label`.
fn served(listen: &str, name: &str, label: &str) -> Option<String> {
    let body = http_get(listen, "/metrics")?;
    body.lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .and_then(|l| l.rsplit_once(' '))
        .map(|(_, v)| v.to_string())
}

const VERDICTS: [&str; 5] = ["leak", "growing", "stable", "transient", "unknown"];

/// The served counts of `name{LABELS verdict="..."}`, in [`VERDICTS`]'
/// order, once two reads an interval apart agree (the target idle).
fn settled_verdicts(listen: &str, name: &str, labels: &str) -> Vec<Option<String>> {
    let judged = |v: &str| served(listen, name, &format!("{labels}verdict=\"{v}\""));
    let mut last: Vec<Option<String>> = Vec::new();
    for _ in 0..10 {
        let now: Vec<Option<String>> = VERDICTS.iter().map(|v| judged(v)).collect();
        if now == last {
            break;
        }
        last = now;
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
    last
}

#[test]
fn prometheus_scrapes_metrics_and_go_tool_pprof_the_live_profile() {
    require_root();
    require_memtrace();
    let exe = build_fixture("leaks", Variant::FramePointers);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut target = TestProcess::spawn_ready(&exe, &["attach"]);
    let mut session = AttachSession::spawn(
        target.pid(),
        &["--listen", &listen, "--metrics-top-sites", "3", "-i", "1s"],
        &[],
    );
    session.memtrace.wait_attached();
    target.go();
    target.wait_done();
    // A real Prometheus (Debian's) scraping memtrace every second.
    let (_prom, prom_addr) = start_prometheus(&listen, port);
    // memtrace's own figure, once an interval after the work has shown it.
    let metric = |name: &str| -> Option<String> {
        let body = http_get(&listen, "/metrics")?;
        body.lines()
            .find(|l| l.starts_with(&format!("{name}{{")))
            .and_then(|l| l.rsplit_once(' '))
            .map(|(_, v)| v.to_string())
    };
    let mut live = String::new();
    for _ in 0..40 {
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let now = metric("memtrace_outstanding_bytes").unwrap_or_default();
        if !now.is_empty() && now != "0" && now == live {
            break;
        }
        live = now;
    }
    // Prometheus stores what memtrace serves.
    assert_eq!(
        prometheus_until(&prom_addr, "memtrace_outstanding_bytes", &live),
        live
    );
    // The fixture talks to the test over pipes: memtrace counts them by kind.
    let body = http_get(&listen, "/metrics").unwrap();
    let pipes = body
        .lines()
        .find(|l| l.starts_with("memtrace_process_open_fds{") && l.contains("kind=\"pipe\""))
        .and_then(|l| l.rsplit_once(' '))
        .map(|(_, v)| v.to_string())
        .unwrap_or_else(|| panic!("no pipe fds:\n{body}"));
    prometheus_until(
        &prom_addr,
        "memtrace_process_open_fds{kind=\"pipe\"}",
        &pipes,
    );
    // The heap sites' verdicts, judged live from the history (no
    // --snapshot-every): one per site holding blocks, and, the fixture idle,
    // what the final report says.
    let sites = served(&listen, "memtrace_sites", "").unwrap();
    prometheus_until(&prom_addr, "sum(memtrace_sites_by_verdict)", &sites);
    let live_verdicts = settled_verdicts(&listen, "memtrace_sites_by_verdict", "");
    let leaks = live_verdicts[0].clone().expect("memtrace_sites_by_verdict");
    prometheus_until(
        &prom_addr,
        "memtrace_sites_by_verdict{verdict=\"leak\"}",
        &leaks,
    );
    // The live profile, read by go tool pprof from the endpoint Parca scrapes.
    let url = format!("http://{listen}/debug/pprof/heap");
    let top = go_pprof(&["-top", "-unit=B"], Path::new(&url));
    assert!(top.contains(&format!("Total samples = {live}B")), "{top}");
    assert!(top.contains("leak_realloc_chain"), "{top}");
    // And the report at the end says the same (the fixture is idle since its
    // work was done: nothing moves).
    let run = session.stop(libc::SIGINT);
    run.assert_exit(0);
    assert_eq!(run.report.total("outstanding_bytes").to_string(), live);
    for (v, n) in VERDICTS.iter().zip(&live_verdicts) {
        assert_eq!(
            Some(run.report.0["verdicts"][v].to_string()),
            *n,
            "{v}: {}",
            run.report.0["verdicts"]
        );
    }
    target.finish_unharmed();
}

#[test]
fn prometheus_counts_the_traced_threads_and_their_verdicts() {
    require_root();
    require_memtrace();
    let exe = build_fixture("thread_sites", Variant::FramePointers);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut target = TestProcess::spawn_ready(&exe, &["attach"]);
    let mut session = AttachSession::spawn(
        target.pid(),
        &["--listen", &listen, "--interval", "100ms"],
        &[],
    );
    session.memtrace.wait_attached();
    target.go();
    target.wait_done();
    let (_prom, prom_addr) = start_prometheus(&listen, port);
    // thread_sites keeps 12 threads running and 12 exited unjoined, from
    // two sites (tests/it/threads.rs).
    prometheus_until(
        &prom_addr,
        "memtrace_traced_resources{resource=\"thread\",kind=\"thread\"}",
        "24",
    );
    prometheus_until(
        &prom_addr,
        "sum(memtrace_resource_sites_by_verdict{resource=\"thread\"})",
        "2",
    );
    // Their verdicts, judged live: the fixture idle, what the report says.
    let live = settled_verdicts(
        &listen,
        "memtrace_resource_sites_by_verdict",
        "resource=\"thread\",",
    );
    let run = session.stop(libc::SIGINT);
    run.assert_exit(0);
    let t = &run.report.0["resources"]["threads"];
    for (v, n) in VERDICTS.iter().zip(&live) {
        assert_eq!(Some(t["verdicts"][v].to_string()), *n, "{v}: {t}");
    }
    let held: u64 = t["sites"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["outstanding"].as_u64().unwrap())
        .sum();
    assert_eq!(held, 24, "{t}");
    target.finish_unharmed();
}
