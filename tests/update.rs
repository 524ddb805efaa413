//! Releases that reach the machines (issue 18): `publish` keeps a signed release repository,
//! `update` follows it over `file://`, and over `http://` and `https://` from Debian's nginx
//! (started here on 127.0.0.1 with a config the test writes; the https CA made by openssl),
//! through a fault-injecting TCP proxy of the test's own (cuts, stalls, endless data).

mod common;

use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;

/// A release server (its own state root and repository) and a signing key; the client
/// config trusts the key.
struct Rel {
    env: Env,
    server: PathBuf,
    repo: PathBuf,
    secret: PathBuf,
    public: PathBuf,
}

impl Rel {
    fn new() -> Rel {
        let env = Env::new();
        let server = env.path("server");
        init_root(&server);
        let (public, secret) = minisign_keypair(&env, "release");
        let repo = env.path("repo");
        let r = Rel {
            env,
            server,
            repo,
            secret,
            public,
        };
        r.config("client.toml", "");
        r
    }

    /// Writes a client config trusting the release key, with `extra` lines after it.
    fn config(&self, name: &str, extra: &str) -> PathBuf {
        let p = self.env.path(name);
        fs::write(
            &p,
            format!(
                "[trust]\npublic_keys = [\"{}\"]\n{extra}",
                self.public.display()
            ),
        )
        .unwrap();
        p
    }

    /// A release tree: shared files, one changed per version, and `big` bytes of noise that
    /// change a little with each version.
    fn tree(&self, n: u64, big: usize) -> PathBuf {
        let mut data = noise(big, 7);
        if big > 0 {
            let at = (n as usize * 4099) % big;
            data[at..(at + 16).min(big)].fill(n as u8);
        }
        let spec = TreeSpec::new()
            .dir("etc")
            .file("etc/version", format!("{n}\n"))
            .file("etc/shared", "the same in every version\n".repeat(50))
            .dir("usr")
            .file("usr/big", data)
            .file(format!("usr/only-{n}"), noise(2000, n));
        self.env.tree(&format!("v{n}"), &spec)
    }

    fn publish(&self, version: &str, dir: &Path, extra: &[&str]) -> Run {
        let mut c = ts_cmd();
        c.arg("--root")
            .arg(&self.server)
            .args(["publish", "--channel", "stable", "--version", version])
            .arg("--repo")
            .arg(&self.repo)
            .arg("--from-dir")
            .arg(dir)
            .arg("--sign")
            .arg(&self.secret)
            .args(extra);
        run(&mut c)
    }

    /// `publish --refresh` of channel `stable`, signed: a new serial, the same versions.
    fn refresh(&self) -> Run {
        let mut c = ts_cmd();
        c.arg("--root")
            .arg(&self.server)
            .args(["publish", "--refresh", "--channel", "stable"])
            .arg("--repo")
            .arg(&self.repo)
            .arg("--sign")
            .arg(&self.secret);
        run(&mut c)
    }

    fn file_url(&self) -> String {
        format!("file://{}", self.repo.display())
    }

    /// `treeswap --config CONFIG --root ROOT update --url URL ARGS...`
    fn update(&self, root: &Path, config: &str, url: &str, args: &[&str]) -> Run {
        run(&mut self.update_cmd(root, config, url, args))
    }

    fn update_cmd(&self, root: &Path, config: &str, url: &str, args: &[&str]) -> Command {
        let mut c = ts_cmd();
        c.arg("--config")
            .arg(self.env.path(config))
            .arg("--root")
            .arg(root)
            .args(["update", "--url", url])
            .args(args);
        c
    }

    fn index(&self) -> String {
        fs::read_to_string(self.repo.join("stable/index.toml")).unwrap()
    }

    /// A new client root.
    fn client(&self, name: &str) -> PathBuf {
        let p = self.env.path(name);
        init_root(&p);
        p
    }
}

/// What a command that must change nothing is checked against: every path of the root with
/// its inode, mode, size and links, and the state file's text (the lock's text is the
/// holder's, rewritten by every writer; `last-apply.toml` records a writer's outcome, a
/// refusal too, for `status`: `update_records_its_outcome_for_status` checks it).
fn root_state(root: &Path) -> (Listing, String) {
    let mut l = listing(root);
    l.remove(&b"lock"[..]);
    l.remove(&b"last-apply.toml"[..]);
    (
        l,
        fs::read_to_string(root.join("state.toml")).unwrap_or_default(),
    )
}

#[track_caller]
fn assert_unchanged(before: &(Listing, String), root: &Path) {
    let after = root_state(root);
    let d = diff_listings(&before.0, &after.0);
    assert!(d.is_empty(), "the root changed:\n{}", d.join("\n"));
    assert_eq!(before.1, after.1, "the state file changed");
}

fn json(r: &Run) -> serde_json::Value {
    serde_json::from_str(&r.stdout()).unwrap_or_else(|e| panic!("{e}: {}", r.stdout()))
}

/// The `current` link's target.
fn current(root: &Path) -> String {
    fs::read_link(root.join("current"))
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// Signs `file` with the stock minisign tool (`FILE.minisig`).
fn minisign_sign(secret: &Path, file: &Path) {
    minisign_sign_as(secret, file, "treeswap release index");
}

/// [`minisign_sign`] with the trusted comment `comment` (an index's starts with
/// `treeswap release index`).
fn minisign_sign_as(secret: &Path, file: &Path, comment: &str) {
    let st = Command::new("minisign")
        .arg("-S")
        .arg("-s")
        .arg(secret)
        .arg("-t")
        .arg(comment)
        .arg("-m")
        .arg(file)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn publish_writes_the_repository_and_prunes() {
    if skip_unless_root() {
        return;
    }
    let rel = Rel::new();
    for n in 1..=4 {
        rel.publish(&n.to_string(), &rel.tree(n, 0), &["--keep", "2"])
            .success()
            .stdout_has(&format!("serial {n}"));
    }
    let ix = rel.index();
    // The last two versions before 4 and 4 itself; a delta to 4 from each and from the empty
    // tree; the deltas to 2 and 3 that remain valid; nothing else on disk.
    let versions: Vec<&str> = ix
        .lines()
        .filter_map(|l| l.strip_prefix("name = "))
        .collect();
    assert_eq!(versions, ["\"2\"", "\"3\"", "\"4\""], "{ix}");
    let named: std::collections::BTreeSet<String> = ix
        .lines()
        .filter_map(|l| l.strip_prefix("path = \""))
        .map(|p| p.trim_end_matches('"').to_owned())
        .collect();
    let mut on_disk = std::collections::BTreeSet::new();
    let mut stack = vec![rel.repo.join("stable/deltas")];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                on_disk.insert(p.strip_prefix(&rel.repo).unwrap().display().to_string());
            }
        }
    }
    assert_eq!(named, on_disk);
    assert!(named.contains("stable/deltas/4/empty.delta"), "{named:?}");
    assert_eq!(named.iter().filter(|p| p.contains("/4/")).count(), 3);
    // The index's signature is a stock minisign one.
    let st = Command::new("minisign")
        .args(["-Vq", "-p"])
        .arg(&rel.public)
        .arg("-m")
        .arg(rel.repo.join("stable/index.toml"))
        .status()
        .unwrap();
    assert!(st.success(), "minisign -V did not verify the index");
    // --refresh: a new serial, the same versions and deltas.
    let mut c = ts_cmd();
    c.arg("--root")
        .arg(&rel.server)
        .args([
            "publish",
            "--refresh",
            "--channel",
            "stable",
            "--expires",
            "1h",
        ])
        .arg("--repo")
        .arg(&rel.repo)
        .arg("--sign")
        .arg(&rel.secret);
    run(&mut c).success().stdout_has("serial 5");
    let refreshed = rel.index();
    assert!(refreshed.contains("serial = 5"));
    let body = |t: &str| t.split("[[version]]").nth(1).unwrap().to_owned();
    assert_eq!(body(&ix), body(&refreshed));
    // A bad duration is a usage error; nothing changes.
    rel.publish("5", &rel.tree(5, 0), &["--expires", "3w"])
        .exit(2)
        .one_line_error();
    assert_eq!(rel.index(), refreshed);
    // Another channel never touches this one's files.
    let mut c = ts_cmd();
    c.arg("--root")
        .arg(&rel.server)
        .args(["publish", "--channel", "testing", "--version", "4"])
        .arg("--repo")
        .arg(&rel.repo)
        .arg("--from-dir")
        .arg(rel.env.path("v4"));
    run(&mut c).success();
    assert_eq!(rel.index(), refreshed);
    assert!(rel.repo.join("testing/deltas/4/empty.delta").is_file());
}

#[test]
fn paths_over_file_urls() {
    if skip_unless_root() {
        return;
    }
    let rel = Rel::new();
    let url = rel.file_url();
    rel.publish("1", &rel.tree(1, 0), &[]).success();
    rel.publish("2", &rel.tree(2, 0), &[]).success();

    // An empty root bootstraps from the delta from the empty tree.
    let a = rel.client("a");
    rel.update(&a, "client.toml", &url, &["--check"])
        .success()
        .stdout_has("update available: `2`");
    let r = rel.update(&a, "client.toml", &url, &["--dry-run", "--json"]);
    r.success();
    assert_eq!(json(&r)["path"][0]["from"], serde_json::Value::Null);
    let r = rel.update(&a, "client.toml", &url, &["--json"]);
    r.success();
    assert_eq!(json(&r)["result"], "applied");
    assert_eq!(json(&r)["path"][0]["path"], "stable/deltas/2/empty.delta");
    assert_eq!(current(&a), "2");
    assert_same_dirs(&rel.env.path("v2"), &a.join("trees/2"));
    ts(&a, ["verify"]).success();
    // A first install has nothing to fall back to: it is not pending.
    let st = fs::read_to_string(a.join("state.toml")).unwrap();
    assert!(!st.contains("pending"), "{st}");
    assert!(st.contains("stable = 2"), "{st}");
    // Up to date: exit 4, --check too.
    rel.update(&a, "client.toml", &url, &[])
        .exit(4)
        .stderr_has("is current already");
    rel.update(&a, "client.toml", &url, &["--check"]).exit(4);
    // The download is gone; only the kept index is left.
    let left: Vec<String> = names(&a.join("downloads"))
        .iter()
        .map(|n| show(n))
        .collect();
    assert!(left.iter().all(|n| n.starts_with("index.")), "{left:?}");

    // Clients at 1 (two behind once 3 is out: the leapfrog delta) and at 2 (one behind).
    let b = rel.client("b");
    rel.update(&b, "client.toml", &url, &[]).success();
    let c = rel.client("c");
    let one = rel.env.path("v1");
    ts(
        &c,
        [
            OsStr::new("import"),
            one.as_os_str(),
            OsStr::new("--version"),
            OsStr::new("1"),
            OsStr::new("--activate"),
        ],
    )
    .success();
    rel.publish("3", &rel.tree(3, 0), &[]).success();
    for (root, from) in [(&c, "1"), (&b, "2")] {
        let r = rel.update(root, "client.toml", &url, &["--json", "--no-restart"]);
        r.success();
        let j = json(&r);
        assert_eq!(j["path"].as_array().unwrap().len(), 1, "{j}");
        assert_eq!(j["path"][0]["from"], from, "{j}");
        assert_eq!(current(root), "3");
        assert_same_dirs(&rel.env.path("v3"), &root.join("trees/3"));
    }

    // `previous` is the only base a delta exists for: current is a local build.
    let d = rel.client("d");
    for (v, dir) in [("2", rel.env.path("v2")), ("2.9", rel.tree(29, 0))] {
        ts(
            &d,
            [
                OsStr::new("import"),
                dir.as_os_str(),
                OsStr::new("--version"),
                OsStr::new(v),
                OsStr::new("--activate"),
            ],
        )
        .success();
    }
    ts(&d, ["mark-good"]).success();
    let r = rel.update(&d, "client.toml", &url, &["--json"]);
    r.success();
    assert_eq!(json(&r)["path"][0]["from"], "2");
    assert_eq!(current(&d), "3");

    // Installed but not current: a switch. --stage-only leaves current alone.
    ts(&d, ["switch", "2.9"]).success();
    rel.update(&d, "client.toml", &url, &["--dry-run"])
        .success()
        .stdout_has("a switch");
    rel.update(&d, "client.toml", &url, &[]).success();
    assert_eq!(current(&d), "3");
    rel.publish("4", &rel.tree(4, 0), &[]).success();
    rel.update(&d, "client.toml", &url, &["--stage-only"])
        .success()
        .stdout_has("staged");
    assert_eq!(current(&d), "3");
    assert!(d.join("trees/4").is_dir());
}

#[test]
fn refused_indexes_change_nothing() {
    if skip_unless_root() {
        return;
    }
    let rel = Rel::new();
    let url = rel.file_url();
    let dir = rel.repo.join("stable");
    rel.publish("1", &rel.tree(1, 0), &[]).success();
    let client = rel.client("client");
    rel.update(&client, "client.toml", &url, &[]).success();
    // The serial-1 index, kept to replay it later.
    let old = (
        fs::read(dir.join("index.toml")).unwrap(),
        fs::read(dir.join("index.toml.minisig")).unwrap(),
    );
    rel.publish("2", &rel.tree(2, 0), &[]).success();
    let good = (
        fs::read(dir.join("index.toml")).unwrap(),
        fs::read(dir.join("index.toml.minisig")).unwrap(),
    );
    let put = |ix: &[u8], sig: Option<&[u8]>| {
        fs::write(dir.join("index.toml"), ix).unwrap();
        match sig {
            Some(s) => fs::write(dir.join("index.toml.minisig"), s).unwrap(),
            None => {
                let _ = fs::remove_file(dir.join("index.toml.minisig"));
            }
        }
    };
    let (_, other_key) = minisign_keypair(&rel.env, "other");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let good_text = String::from_utf8(good.0.clone()).unwrap();
    let field = |text: &str, key: &str, value: String| -> String {
        text.lines()
            .map(|l| match l.starts_with(&format!("{key} = ")) {
                true => format!("{key} = {value}"),
                false => l.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n")
            + "\n"
    };
    // An index signed by the release key with some field changed (stock minisign).
    let resigned = |text: String, key: &Path| -> (Vec<u8>, Vec<u8>) {
        let p = rel.env.path("crafted.toml");
        fs::write(&p, &text).unwrap();
        minisign_sign(key, &p);
        (
            text.into_bytes(),
            fs::read(rel.env.path("crafted.toml.minisig")).unwrap(),
        )
    };
    let mut tampered = good.0.clone();
    let at = tampered.len() - 10;
    tampered[at] ^= 1;
    let expired = resigned(
        field(
            &field(&good_text, "timestamp", (now - 100).to_string()),
            "expires",
            (now - 10).to_string(),
        ),
        &rel.secret,
    );
    let future = resigned(
        field(&good_text, "timestamp", (now + 3600).to_string()),
        &rel.secret,
    );
    let other_channel = resigned(
        field(&good_text, "channel", "\"testing\"".into()),
        &rel.secret,
    );
    let unknown_key = resigned(good_text.clone(), &other_key);
    /// What is refused, the index and signature served, the exit code and the message.
    type Case<'a> = (&'a str, Vec<u8>, Option<Vec<u8>>, i32, &'a str);
    let cases: Vec<Case> = vec![
        (
            "bad signature",
            tampered,
            Some(good.1.clone()),
            10,
            "does not verify",
        ),
        (
            "unknown key",
            unknown_key.0,
            Some(unknown_key.1),
            10,
            "does not verify",
        ),
        ("no signature", good.0.clone(), None, 10, "not signed"),
        (
            "truncated",
            good.0[..good.0.len() / 2].to_vec(),
            Some(good.1.clone()),
            10,
            "does not verify",
        ),
        ("expired", expired.0, Some(expired.1), 12, "expired"),
        (
            "future-dated",
            future.0,
            Some(future.1),
            12,
            "in the future",
        ),
        (
            "other channel",
            other_channel.0,
            Some(other_channel.1),
            14,
            "channel `testing`",
        ),
    ];
    for (what, ix, sig, code, msg) in cases {
        put(&ix, sig.as_deref());
        let before = root_state(&client);
        for args in [&[][..], &["--check"][..], &["--dry-run"][..]] {
            let r = rel.update(&client, "client.toml", &url, args);
            r.exit(code).one_line_error().stderr_has(msg);
            assert_unchanged(&before, &client);
            assert!(!r.stderr().is_empty(), "{what}");
        }
    }
    // Oversized: read no further than the caps, one line, nothing changed.
    for (ix, sig) in [
        (vec![b'#'; 5 << 20], good.1.clone()),
        (good.0.clone(), vec![b'x'; 100 << 10]),
    ] {
        put(&ix, Some(&sig));
        let before = root_state(&client);
        rel.update(&client, "client.toml", &url, &[])
            .exit(1)
            .one_line_error()
            .stderr_has("is larger than");
        assert_unchanged(&before, &client);
    }
    // The good index is accepted; then the older one, replayed, is a rollback.
    put(&good.0, Some(&good.1));
    rel.update(&client, "client.toml", &url, &[]).success();
    assert_eq!(current(&client), "2");
    put(&old.0, Some(&old.1));
    let before = root_state(&client);
    rel.update(&client, "client.toml", &url, &[])
        .exit(13)
        .one_line_error()
        .stderr_has("older than serial 2");
    assert_unchanged(&before, &client);
}

#[test]
fn downloads_that_do_not_match() {
    if skip_unless_root() {
        return;
    }
    let rel = Rel::new();
    let url = rel.file_url();
    rel.publish("1", &rel.tree(1, 300_000), &[]).success();
    // A mirror whose copy of the delta is wrong: dropped, the url's own server serves it.
    let mirror = rel.env.path("mirror");
    let st = Command::new("cp")
        .arg("-a")
        .arg(&rel.repo)
        .arg(&mirror)
        .status()
        .unwrap();
    assert!(st.success());
    let delta = "stable/deltas/1/empty.delta";
    let mut bad = fs::read(mirror.join(delta)).unwrap();
    bad[1000] ^= 0xff;
    fs::write(mirror.join(delta), &bad).unwrap();
    rel.config(
        "mirror.toml",
        &format!("[update]\nmirrors = [\"file://{}\"]\n", mirror.display()),
    );
    let a = rel.client("a");
    rel.update(&a, "mirror.toml", &url, &[])
        .success()
        .stderr_has("a source was dropped for this run: `file://");
    assert_same_dirs(&rel.env.path("v1"), &a.join("trees/1"));

    // The server's file is longer than the index says, with the right bytes first: only the
    // signed size is read, and it applies.
    let b = rel.client("b");
    let good = fs::read(rel.repo.join(delta)).unwrap();
    let mut longer = good.clone();
    longer.extend(noise(100_000, 3));
    fs::write(rel.repo.join(delta), &longer).unwrap();
    let r = rel.update(&b, "client.toml", &url, &["--json"]);
    r.success();
    assert_eq!(json(&r)["fetched"], good.len() as u64);

    // Wrong bytes everywhere: exit 15, nothing installed, no bytes kept.
    let c = rel.client("c");
    let before = root_state(&c);
    fs::write(rel.repo.join(delta), &bad).unwrap();
    rel.update(&c, "mirror.toml", &url, &[])
        .exit(15)
        .one_line_error()
        .stderr_has("does not match");
    let _ = fs::remove_dir(c.join("downloads"));
    assert_unchanged_but_serial(&before, &c);
}

// ---------------------------------------------------------------------------------------------
// nginx, a private CA, and a proxy that injects faults

/// A free port on 127.0.0.1 (bound, then let go).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Debian's nginx serving `repo` on 127.0.0.1, with TLS if `tls` gives a certificate and key;
/// its access log says status, bytes and range of each request.
struct Nginx {
    child: Child,
    port: u16,
    dir: PathBuf,
    https: bool,
}

impl Nginx {
    fn start(env: &Env, name: &str, repo: &Path, tls: Option<(&Path, &Path)>) -> Nginx {
        let dir = env.path(name);
        fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let (ssl, certs) = match tls {
            Some((cert, key)) => (
                " ssl",
                format!(
                    "ssl_certificate {};\n    ssl_certificate_key {};\n",
                    cert.display(),
                    key.display()
                ),
            ),
            None => ("", String::new()),
        };
        let d = dir.display();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n  default_type application/octet-stream;\n  log_format t '$status $body_bytes_sent \"$http_range\" $request_uri';\n  access_log {d}/access.log t;\n\
               client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
               server {{\n    listen 127.0.0.1:{port}{ssl};\n    {certs}    root {};\n  }}\n}}\n",
            repo.display()
        );
        fs::write(dir.join("nginx.conf"), conf).unwrap();
        let child = Command::new("nginx")
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-p")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run nginx (Debian package nginx-light)");
        let n = Nginx {
            child,
            port,
            dir,
            https: tls.is_some(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nginx did not start: {}",
                fs::read_to_string(n.dir.join("error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        n
    }

    fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The access log's lines for URIs containing `needle`: (status, bytes, range).
    fn requests(&self, needle: &str) -> Vec<(u16, u64, String)> {
        fs::read_to_string(self.dir.join("access.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.ends_with(needle) || l.contains(&format!("{needle} ")))
            .map(|l| {
                let mut f = l.splitn(4, ' ');
                let status = f.next().unwrap().parse().unwrap();
                let bytes = f.next().unwrap().parse().unwrap();
                let range = f.next().unwrap().trim_matches('"').to_owned();
                (status, bytes, range)
            })
            .collect()
    }

    /// [`Nginx::requests`], once at least `n` of them are logged (at most 5 s): nginx logs a
    /// request once it is done with it, which may be after the client is.
    fn requests_at_least(&self, needle: &str, n: usize) -> Vec<(u16, u64, String)> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let r = self.requests(needle);
            if r.len() >= n || Instant::now() >= deadline {
                return r;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A CA and a certificate for 127.0.0.1 it signed, made by openssl: (ca, cert, key).
fn private_ca(env: &Env) -> (PathBuf, PathBuf, PathBuf) {
    let p = |n: &str| env.path(n);
    let sh = format!(
        "set -e; cd {}; \
         openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=treeswap-test-ca -keyout ca.key -out ca.pem; \
         openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout srv.key -out srv.csr; \
         printf 'subjectAltName=IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\n' > ext.cnf; \
         openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile ext.cnf -out srv.pem",
        env.dir.path().display()
    );
    let out = Command::new("sh")
        .arg("-c")
        .arg(&sh)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (p("ca.pem"), p("srv.pem"), p("srv.key"))
}

/// What the proxy does to the connections it forwards.
#[derive(Default)]
struct Faults {
    /// The next this many connections are cut after `cut_after` bytes of response each.
    cuts: AtomicU32,
    cut_after: AtomicU64,
    /// The next this many connections stall (forward nothing more, stay open) after
    /// `stall_after` bytes.
    stalls: AtomicU32,
    stall_after: AtomicU64,
    /// Bytes forwarded to clients, and connections accepted.
    sent: AtomicU64,
    connections: AtomicU32,
    stop: AtomicBool,
}

/// A TCP proxy on 127.0.0.1 in front of `upstream`, injecting `Faults`.
struct Proxy {
    port: u16,
    faults: Arc<Faults>,
}

impl Proxy {
    fn start(upstream: u16) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let faults = Arc::new(Faults::default());
        let f = faults.clone();
        std::thread::spawn(move || {
            for client in l.incoming() {
                let Ok(client) = client else { break };
                if f.stop.load(Ordering::Relaxed) {
                    break;
                }
                f.connections.fetch_add(1, Ordering::Relaxed);
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let take = |n: &AtomicU32| {
                    n.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| c.checked_sub(1))
                        .is_ok()
                };
                let cut = take(&f.cuts).then(|| f.cut_after.load(Ordering::Relaxed));
                let stall = take(&f.stalls).then(|| f.stall_after.load(Ordering::Relaxed));
                let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c2, &mut s2);
                    let _ = s2.shutdown(std::net::Shutdown::Write);
                });
                let f = f.clone();
                std::thread::spawn(move || {
                    let (mut server, mut client) = (server, client);
                    let mut buf = [0u8; 16 << 10];
                    let mut n_sent = 0u64;
                    loop {
                        let limit = cut.or(stall).map_or(u64::MAX, |l| l - n_sent.min(l));
                        if limit == 0 {
                            if stall.is_some() {
                                while !f.stop.load(Ordering::Relaxed) {
                                    std::thread::sleep(Duration::from_millis(50));
                                }
                            }
                            break;
                        }
                        let want = buf.len().min(limit.min(usize::MAX as u64) as usize);
                        let n = match server.read(&mut buf[..want]) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if client.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        n_sent += n as u64;
                        f.sent.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    let _ = server.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        Proxy { port, faults }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.faults.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// A server of the test's own that answers every request for a delta with endless bytes
/// (no length, never ending) and serves the index files from `repo`.
fn endless_server(repo: PathBuf) -> (u16, Arc<AtomicU64>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let sent = Arc::new(AtomicU64::new(0));
    let s = sent.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { break };
            let repo = repo.clone();
            let s = s.clone();
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && c.read(&mut b).is_ok_and(|n| n == 1) {
                    head.push(b[0]);
                }
                let line = String::from_utf8_lossy(&head);
                let path = line.split(' ').nth(1).unwrap_or("/").to_owned();
                if path.ends_with(".delta") {
                    let _ = c.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
                    let junk = noise(64 << 10, 11);
                    while c.write_all(&junk).is_ok() {
                        s.fetch_add(junk.len() as u64, Ordering::Relaxed);
                    }
                } else {
                    let body =
                        fs::read(repo.join(path.trim_start_matches('/'))).unwrap_or_default();
                    let _ = write!(
                        c,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = c.write_all(&body);
                }
            });
        }
    });
    (port, sent)
}

#[test]
fn http_and_https_from_nginx() {
    if skip_unless_root() {
        return;
    }
    let rel = Rel::new();
    rel.publish("1", &rel.tree(1, 200_000), &[]).success();
    let http = Nginx::start(&rel.env, "nginx-http", &rel.repo, None);
    let a = rel.client("a");
    // A mirror that does not have the file (404) is dropped at once, not retried.
    rel.config(
        "missing.toml",
        &format!("[update]\nmirrors = [\"{}/missing\"]\n", http.url()),
    );
    let t = Instant::now();
    rel.update(&a, "missing.toml", &http.url(), &[])
        .success()
        .stderr_has("HTTP status 404");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(
        http.requests_at_least("/missing/stable/deltas/1/empty.delta", 1)
            .len(),
        1
    );
    assert_same_dirs(&rel.env.path("v1"), &a.join("trees/1"));
    // Up to date: the index is asked for conditionally, and nginx answers 304.
    rel.update(&a, "client.toml", &http.url(), &[]).exit(4);
    let ix = http.requests_at_least("/stable/index.toml", 2);
    assert_eq!(
        ix.iter().map(|r| r.0).collect::<Vec<_>>(),
        [200, 304],
        "{ix:?}"
    );

    // https with a private CA.
    let (ca, cert, key) = private_ca(&rel.env);
    let https = Nginx::start(&rel.env, "nginx-https", &rel.repo, Some((&cert, &key)));
    rel.publish("2", &rel.tree(2, 200_000), &[]).success();
    let before = root_state(&a);
    // Without the CA, the server is not trusted: nothing changes.
    rel.update(&a, "client.toml", &https.url(), &[])
        .exit(1)
        .one_line_error();
    assert_unchanged(&before, &a);
    rel.config("ca.toml", &format!("[update]\nca = \"{}\"\n", ca.display()));
    let r = rel.update(&a, "ca.toml", &https.url(), &["--json"]);
    r.success();
    assert_eq!(json(&r)["path"][0]["from"], "1");
    assert_same_dirs(&rel.env.path("v2"), &a.join("trees/2"));

    // Endless data from a mirror: dropped after the signed size, nginx serves the delta.
    rel.publish("3", &rel.tree(3, 200_000), &[]).success();
    let (port, sent) = endless_server(rel.repo.clone());
    rel.config(
        "endless.toml",
        &format!("[update]\nmirrors = [\"http://127.0.0.1:{port}\"]\n"),
    );
    let r = rel.update(&a, "endless.toml", &http.url(), &["--json"]);
    r.success();
    let j = json(&r);
    assert!(r.stderr().contains("does not match"), "{}", r.stderr());
    assert_eq!(current(&a), "3");
    // The client read no more than the delta's size from the endless mirror (what the
    // server wrote beyond that sat in socket buffers).
    assert!(sent.load(Ordering::Relaxed) < j["bytes"].as_u64().unwrap() + (16 << 20));
    // The endless server as the only source: exit 15, nothing kept.
    rel.publish("4", &rel.tree(4, 200_000), &[]).success();
    let before = root_state(&a);
    rel.update(&a, "client.toml", &format!("http://127.0.0.1:{port}"), &[])
        .exit(15)
        .one_line_error();
    assert_unchanged_but_serial(&before, &a);
}

#[test]
fn resumes_after_cuts_stalls_and_kill() {
    if skip_unless_root() {
        return;
    }
    let rel = Rel::new();
    // About 3 MiB of noise: a delta of three chunks and more.
    rel.publish("1", &rel.tree(1, 3 << 20), &[]).success();
    let nginx = Nginx::start(&rel.env, "nginx", &rel.repo, None);
    let delta = "/stable/deltas/1/empty.delta";
    let size = fs::metadata(rel.repo.join(&delta[1..])).unwrap().len();
    rel.config("fast.toml", "[update]\nstall_timeout = 1\nretries = 2\n");

    // Three connections cut, then one that stalls: each resumed where it stopped.
    let proxy = Proxy::start(nginx.port);
    proxy.faults.cut_after.store(700_000, Ordering::Relaxed);
    proxy.faults.cuts.store(3, Ordering::Relaxed);
    let a = rel.client("a");
    let r = rel.update(&a, "fast.toml", &proxy.url(), &["--json"]);
    r.success();
    assert_same_dirs(&rel.env.path("v1"), &a.join("trees/1"));
    let reqs = nginx.requests_at_least(delta, 4);
    assert!(reqs.len() >= 4, "{reqs:?}");
    assert!(
        reqs[1..].iter().all(|r| r.2.starts_with("bytes=")),
        "{reqs:?}"
    );
    let fetched = json(&r)["fetched"].as_u64().unwrap();
    assert_eq!(fetched, size, "a resumed download fetches nothing twice");

    let b = rel.client("b");
    proxy.faults.stall_after.store(1_500_000, Ordering::Relaxed);
    proxy.faults.stalls.store(1, Ordering::Relaxed);
    let t = Instant::now();
    let r = rel.update(&b, "fast.toml", &proxy.url(), &["--json"]);
    r.success();
    assert_eq!(json(&r)["fetched"].as_u64().unwrap(), size);
    assert!(t.elapsed() < Duration::from_secs(20));

    // kill -9 in the middle of a download (the proxy stalls it), then `update` again: it
    // asks for the rest only.
    let c = rel.client("c");
    proxy.faults.stall_after.store(1_200_000, Ordering::Relaxed);
    proxy.faults.stalls.store(1, Ordering::Relaxed);
    let mut child = rel
        .update_cmd(&c, "client.toml", &proxy.url(), &[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let part = || {
        names(&c.join("downloads"))
            .into_iter()
            .find(|n| n.ends_with(b".part"))
            .map(|n| {
                fs::metadata(c.join("downloads").join(bpath(&n)))
                    .unwrap()
                    .len()
            })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = (0, Instant::now());
    loop {
        let now = part().unwrap_or(0);
        if now != last.0 {
            last = (now, Instant::now());
        } else if now > 0 && last.1.elapsed() > Duration::from_millis(300) {
            break;
        }
        assert!(Instant::now() < deadline, "the download did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let had = part().unwrap();
    assert!(had > 0 && had < size, "{had} of {size}");
    let before = nginx.requests(delta).len();
    let r = rel.update(&c, "client.toml", &nginx.url(), &["--json"]);
    r.success();
    let j = json(&r);
    assert_eq!(j["resumed"].as_u64().unwrap(), had, "{j}");
    assert_eq!(j["fetched"].as_u64().unwrap(), size - had, "{j}");
    // The killed run's stalled request may be logged late: the new one is the one from `had`.
    let ranged = || -> Vec<_> {
        nginx.requests(delta)[before..]
            .iter()
            .filter(|r| r.2 != "-")
            .cloned()
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while ranged().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let resumed = ranged();
    assert_eq!(resumed, [(206, size - had, format!("bytes={had}-"))]);
    assert_same_dirs(&rel.env.path("v1"), &c.join("trees/1"));
    assert!(part().is_none());
}

/// The repository's top, for the files of `scripts/boot/`.
const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// `treeswap-update.service` and `.timer` pass `systemd-analyze verify`; the service's
/// command and the cron line update a machine, then succeed with nothing to do.
#[test]
fn update_units_and_cron_line() {
    if skip_unless_root() {
        return;
    }
    let rel = Rel::new();
    rel.publish("1", &rel.tree(1, 0), &[]).success();
    let config = rel.config(
        "units.toml",
        &format!("[update]\nurl = \"{}\"\n", rel.file_url()),
    );
    let boot = Path::new(REPO).join("scripts/boot");
    let units = rel.env.path("units");
    fs::create_dir_all(&units).unwrap();
    for u in ["treeswap-update.service", "treeswap-update.timer"] {
        let text = fs::read_to_string(boot.join(u)).unwrap();
        fs::write(
            units.join(u),
            text.replace("/usr/sbin/treeswap ", &format!("{BIN} ")),
        )
        .unwrap();
    }
    if Path::new("/usr/bin/systemd-analyze").exists() {
        let r = run(Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(units.join("treeswap-update.service"))
            .arg(units.join("treeswap-update.timer")));
        r.success();
        assert!(r.stderr().trim().is_empty(), "{}", r.stderr());
    }
    let service = fs::read_to_string(units.join("treeswap-update.service")).unwrap();
    let value = |key: &str| -> String {
        service
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key}="))
            .to_owned()
    };
    let ok: Vec<i32> = value("SuccessExitStatus")
        .split_whitespace()
        .map(|c| c.parse().unwrap())
        .chain([0])
        .collect();
    let argv: Vec<String> = value("ExecStart")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let a = rel.client("a");
    for want in [0, 4] {
        let r = run(Command::new(&argv[0])
            .args(&argv[1..])
            .env("TREESWAP_ROOT", &a)
            .env("TREESWAP_CONFIG", &config));
        assert_eq!(r.code(), Some(want), "{}", r.stderr());
        assert!(ok.contains(&want));
    }
    assert_eq!(current(&a), "1");
    // The cron line, without its random delay.
    let cron = fs::read_to_string(boot.join("treeswap-update.cron")).unwrap();
    let line = cron.lines().find(|l| !l.starts_with('#')).unwrap();
    let fields: Vec<&str> = line.splitn(7, ' ').collect();
    assert_eq!(fields[5], "root", "{line}");
    let command = fields[6].replace("/usr/sbin/treeswap ", &format!("{BIN} "));
    let b = rel.client("b");
    for _ in 0..2 {
        let r = run(Command::new("sh")
            .arg("-c")
            .arg(&command)
            .env("TREESWAP_UPDATE_SPLAY", "0")
            .env("TREESWAP_ROOT", &b)
            .env("TREESWAP_CONFIG", &config));
        r.success();
        assert_eq!(r.stdout(), "", "cron mails what it prints");
        assert_eq!(r.stderr(), "", "cron mails what it prints");
    }
    assert_eq!(current(&b), "1");
}

/// A machine that skipped releases, with no delta from its tree to the latest: the chain of
/// deltas through the version between (fewer bytes than the delta from the empty tree);
/// the version between is installed, not made current.
#[test]
fn a_chain_through_intermediate_versions() {
    if skip_unless_root() {
        return;
    }
    let rel = Rel::new();
    let url = rel.file_url();
    for n in 1..=3 {
        rel.publish(&n.to_string(), &rel.tree(n, 200_000), &["--keep", "1"])
            .success();
    }
    let c = rel.client("c");
    let one = rel.env.path("v1");
    ts(
        &c,
        [
            OsStr::new("import"),
            one.as_os_str(),
            OsStr::new("--version"),
            OsStr::new("1"),
            OsStr::new("--activate"),
        ],
    )
    .success();
    let r = rel.update(&c, "client.toml", &url, &["--json"]);
    r.success();
    let j = json(&r);
    let steps: Vec<(&str, &str)> = j["path"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["from"].as_str().unwrap(), s["to"].as_str().unwrap()))
        .collect();
    assert_eq!(steps, [("1", "2"), ("2", "3")], "{j}");
    let empty = fs::metadata(rel.repo.join("stable/deltas/3/empty.delta"))
        .unwrap()
        .len();
    assert!(j["bytes"].as_u64().unwrap() < empty, "{j}");
    assert_eq!(current(&c), "3");
    assert_eq!(
        fs::read_link(c.join("previous")).unwrap(),
        Path::new("trees/1")
    );
    assert!(c.join("trees/2").is_dir());
    assert_same_dirs(&rel.env.path("v3"), &c.join("trees/3"));
}

/// A publish cut short between renaming the new signature and the new index leaves a
/// complete new pair under temporary names: the next publish puts it in place first.
#[test]
fn publish_finishes_an_interrupted_index_write() {
    if skip_unless_root() {
        return;
    }
    let rel = Rel::new();
    let dir = rel.repo.join("stable");
    rel.publish("1", &rel.tree(1, 0), &[]).success();
    let one = (
        fs::read(dir.join("index.toml")).unwrap(),
        fs::read(dir.join("index.toml.minisig")).unwrap(),
    );
    rel.publish("2", &rel.tree(2, 0), &[]).success();
    // The serial-2 pair as the interrupted write left it: the new signature renamed, the
    // new index still under its temporary name.
    fs::rename(dir.join("index.toml"), dir.join(".index.toml.new")).unwrap();
    fs::write(dir.join("index.toml"), &one.0).unwrap();
    rel.refresh().success().stdout_has("serial 3");
    assert!(rel.index().contains("latest = \"2\""));
    assert!(!dir.join(".index.toml.new").exists());
    let client = rel.client("client");
    rel.update(&client, "client.toml", &rel.file_url(), &[])
        .success();
    assert_eq!(current(&client), "2");
}

/// A partial download damaged after it was written (a power cut before the page cache
/// reached the disk): a bad complete chunk is fetched again, and a bad unfinished one does
/// not count against the source that finishes it.
#[test]
fn a_damaged_partial_download_is_fetched_again() {
    if skip_unless_root() {
        return;
    }
    let rel = Rel::new();
    let url = rel.file_url();
    rel.publish("1", &rel.tree(1, 3 << 20), &[]).success();
    let delta = fs::read(rel.repo.join("stable/deltas/1/empty.delta")).unwrap();
    let ix = rel.index();
    let sha = ix
        .split("[[delta]]")
        .find(|d| d.contains("stable/deltas/1/empty.delta"))
        .and_then(|d| d.lines().find_map(|l| l.strip_prefix("sha256 = \"")))
        .unwrap()
        .trim_end_matches('"')
        .to_owned();
    let mib = 1 << 20;
    for (name, bad_at) in [("first", 1000), ("tail", mib + mib / 4)] {
        let c = rel.client(name);
        fs::create_dir_all(c.join("downloads")).unwrap();
        let mut part = delta[..mib + mib / 2].to_vec();
        part[bad_at] ^= 0xff;
        fs::write(c.join("downloads").join(format!("{sha}.part")), &part).unwrap();
        let r = rel.update(&c, "client.toml", &url, &["--json"]);
        r.success();
        let j = json(&r);
        let kept = if bad_at < mib { 0 } else { part.len() as u64 };
        assert_eq!(j["resumed"].as_u64().unwrap(), kept, "{name}: {j}");
        assert_same_dirs(&rel.env.path("v1"), &c.join("trees/1"));
        assert!(!c.join("downloads").join(format!("{sha}.part")).exists());
    }
}

/// `update` under 1 GiB of address space (an allocation for bytes that never come fails
/// rather than passing unnoticed), its peak resident memory measured.
fn measured_update(rel: &Rel, root: &Path, config: &str, url: &str) -> Measured {
    let mut m = MeasuredCmd::new("sh");
    m.cmd
        .arg("-c")
        .arg("ulimit -v 1048576 && exec \"$0\" \"$@\"")
        .arg(BIN)
        .arg("--config")
        .arg(rel.env.path(config))
        .arg("--root")
        .arg(root)
        .args(["update", "--url", url, "--no-restart"])
        .env_remove("TREESWAP_ROOT")
        .env("TREESWAP_PROTECT", "hardlink");
    run_measured(m, None)
}

/// Network input at its limits takes bounded memory: an index just under its 4 MiB cap
/// (some 12 000 deltas, signed), and a server that answers for a delta with endless bytes.
#[test]
fn network_input_at_its_limits_takes_bounded_memory() {
    if skip_unless_root() {
        return;
    }
    const MAX_PEAK_RSS_KIB: u64 = 128 << 10;
    let rel = Rel::new();
    rel.publish("1", &rel.tree(1, 0), &[]).success();
    let dir = rel.repo.join("stable");
    let original = fs::read(dir.join("index.toml")).unwrap();
    let original_sig = fs::read(dir.join("index.toml.minisig")).unwrap();
    let mut text = String::from_utf8(original.clone()).unwrap();
    let h = "ab".repeat(32);
    let mut i = 0u64;
    loop {
        let entry = format!(
            "\n[[delta]]\nto = \"1\"\nfrom_digest = \"{:064x}\"\npath = \"stable/deltas/1/filler-{i}.delta\"\nsize = 1\nsha256 = \"{h}\"\nchunks = [\"{h}\"]\n",
            i + 1
        );
        if text.len() + entry.len() >= 4 << 20 {
            break;
        }
        text.push_str(&entry);
        i += 1;
    }
    fs::write(dir.join("index.toml"), &text).unwrap();
    minisign_sign(&rel.secret, &dir.join("index.toml"));
    let a = rel.client("a");
    let m = measured_update(&rel, &a, "client.toml", &rel.file_url());
    m.run.success();
    assert!(i > 10_000, "{i} deltas");
    eprintln!("an index of {i} deltas: peak {} KiB", m.peak_rss_kib);
    assert!(
        m.peak_rss_kib < MAX_PEAK_RSS_KIB,
        "peak {} KiB for an index of {i} deltas",
        m.peak_rss_kib
    );
    assert_eq!(current(&a), "1");

    // (publish would carry the filler deltas over, past the cap: it reads what it wrote.)
    fs::write(dir.join("index.toml"), &original).unwrap();
    fs::write(dir.join("index.toml.minisig"), &original_sig).unwrap();
    rel.publish("2", &rel.tree(2, 0), &[]).success();
    let (port, _) = endless_server(rel.repo.clone());
    let before = root_state(&a);
    let t = Instant::now();
    let m = measured_update(&rel, &a, "client.toml", &format!("http://127.0.0.1:{port}"));
    m.run.exit(15).one_line_error();
    eprintln!("an endless delta: peak {} KiB", m.peak_rss_kib);
    assert!(
        m.peak_rss_kib < MAX_PEAK_RSS_KIB,
        "peak {} KiB",
        m.peak_rss_kib
    );
    assert!(t.elapsed() < Duration::from_secs(10));
    assert_unchanged_but_serial(&before, &a);
}

/// The outcome `status` shows.
fn last_apply(root: &Path) -> serde_json::Value {
    let r = ts(root, ["status", "--json"]);
    r.success();
    json(&r)["last_apply"].clone()
}

/// `update` records its outcome in `last-apply.toml` as `apply` does (applied, staged,
/// switched, nothing, failed; the exit code; `to`; the error), and its readers (`--check`,
/// `--dry-run`) record nothing. (Before: `update` recorded nothing at all.)
#[test]
fn update_records_its_outcome_for_status() {
    if skip_unless_root() {
        return;
    }
    let rel = Rel::new();
    let url = rel.file_url();
    rel.publish("1", &rel.tree(1, 0), &[]).success();
    let c = rel.client("c");
    let record = c.join("last-apply.toml");
    rel.update(&c, "client.toml", &url, &["--check"]).success();
    rel.update(&c, "client.toml", &url, &["--dry-run"])
        .success();
    assert!(!record.exists(), "a reader recorded an outcome");

    rel.update(&c, "client.toml", &url, &[]).success();
    let l = last_apply(&c);
    assert_eq!(l["result"], "applied", "{l}");
    assert_eq!(l["to"], "1", "{l}");
    assert_eq!(l["code"], 0, "{l}");
    assert!(l["error"].is_null(), "{l}");
    ts(&c, ["status"])
        .success()
        .stdout_has("last apply: applied `1`");

    // Up to date: `nothing`, exit 4.
    rel.update(&c, "client.toml", &url, &[]).exit(4);
    let l = last_apply(&c);
    assert_eq!(l["result"], "nothing", "{l}");
    assert_eq!(l["code"], 4, "{l}");
    assert!(l["to"].is_null(), "{l}");

    // Staged, then switched to it.
    rel.publish("2", &rel.tree(2, 0), &[]).success();
    rel.update(&c, "client.toml", &url, &["--stage-only"])
        .success();
    let l = last_apply(&c);
    assert_eq!(
        (&l["result"], &l["to"]),
        (&"staged".into(), &"2".into()),
        "{l}"
    );
    assert_eq!(current(&c), "1");
    rel.update(&c, "client.toml", &url, &[]).success();
    let l = last_apply(&c);
    assert_eq!(
        (&l["result"], &l["to"]),
        (&"switched".into(), &"2".into()),
        "{l}"
    );
    assert_eq!(current(&c), "2");

    // A refused index: `failed`, its exit code and the error; readers leave the record.
    rel.publish("3", &rel.tree(3, 0), &[]).success();
    let ix = rel.repo.join("stable/index.toml");
    let mut text = fs::read(&ix).unwrap();
    let at = text.len() - 10;
    text[at] ^= 1;
    fs::write(&ix, text).unwrap();
    rel.update(&c, "client.toml", &url, &[]).exit(10);
    let l = last_apply(&c);
    assert_eq!(l["result"], "failed", "{l}");
    assert_eq!(l["code"], 10, "{l}");
    assert!(
        l["error"].as_str().unwrap().contains("does not verify"),
        "{l}"
    );
    let kept = fs::read(&record).unwrap();
    rel.update(&c, "client.toml", &url, &["--check"]).exit(10);
    rel.update(&c, "client.toml", &url, &["--dry-run"]).exit(10);
    assert_eq!(
        fs::read(&record).unwrap(),
        kept,
        "a reader changed the record"
    );
    assert_eq!(current(&c), "2");
}

/// `status` counts the partial downloads (`downloads/*.part`); `gc` removes only those
/// untouched for a week (or all, with `--downloads`), so an interrupted update still
/// resumes, and leaves the kept index and anything else in `downloads/` alone.
#[test]
fn status_shows_and_gc_ages_out_partial_downloads() {
    if skip_unless_root() {
        return;
    }
    let rel = Rel::new();
    let url = rel.file_url();
    rel.publish("1", &rel.tree(1, 3 << 20), &[]).success();
    let delta = fs::read(rel.repo.join("stable/deltas/1/empty.delta")).unwrap();
    let sha = rel
        .index()
        .split("[[delta]]")
        .find(|d| d.contains("stable/deltas/1/empty.delta"))
        .and_then(|d| d.lines().find_map(|l| l.strip_prefix("sha256 = \"")))
        .unwrap()
        .trim_end_matches('"')
        .to_owned();
    let c = rel.client("c");
    let st = json(&ts(&c, ["status", "--json"]));
    assert_eq!(
        st["downloads"],
        serde_json::json!({"partial": 0, "bytes": 0})
    );
    let dl = c.join("downloads");
    fs::create_dir_all(&dl).unwrap();
    // A fresh partial download of the delta, one of an older plan untouched for 8 days, and
    // names that are not partial downloads.
    let fresh = dl.join(format!("{sha}.part"));
    let fresh_len = (1 << 20) + 12345;
    fs::write(&fresh, &delta[..fresh_len]).unwrap();
    let old = dl.join(format!("{}.part", "ab".repeat(32)));
    fs::write(&old, noise(5000, 3)).unwrap();
    let week_ago = std::time::SystemTime::now() - Duration::from_secs(8 * 24 * 3600);
    let age = |p: &Path| {
        fs::File::options()
            .write(true)
            .open(p)
            .unwrap()
            .set_modified(week_ago)
            .unwrap()
    };
    age(&old);
    let others = [dl.join("notes.part"), dl.join("index.stable.etag")];
    for o in &others {
        fs::write(o, "x").unwrap();
        age(o);
    }
    fs::create_dir(dl.join(format!("{}.part", "cd".repeat(32)))).unwrap();
    let st = json(&ts(&c, ["status", "--json"]));
    assert_eq!(
        st["downloads"],
        serde_json::json!({"partial": 2, "bytes": fresh_len + 5000}),
        "{st}"
    );
    ts(&c, ["status"])
        .success()
        .stdout_has(&format!("downloads: 2 partial, {} bytes", fresh_len + 5000));

    // gc: the old one goes, the fresh one and the other names stay.
    ts(&c, ["gc"])
        .success()
        .stdout_has("1 partial download(s) (5000 bytes)");
    assert!(!old.exists());
    assert_eq!(fs::metadata(&fresh).unwrap().len(), fresh_len as u64);
    for o in &others {
        assert!(o.exists(), "{}", o.display());
    }
    assert!(dl.join(format!("{}.part", "cd".repeat(32))).is_dir());
    let st = json(&ts(&c, ["status", "--json"]));
    assert_eq!(st["downloads"]["partial"], 1, "{st}");
    let r = ts(&c, ["gc"]);
    r.success();
    assert!(!r.stdout().contains("partial download"), "{}", r.stdout());

    // The update resumes from what gc kept. (It clears the rest of `downloads/`, and a
    // directory there stops it: not gc's business.)
    fs::remove_file(&others[1]).unwrap();
    fs::remove_dir(dl.join(format!("{}.part", "cd".repeat(32)))).unwrap();
    let r = rel.update(&c, "client.toml", &url, &["--json"]);
    r.success();
    assert_eq!(json(&r)["resumed"].as_u64().unwrap(), fresh_len as u64);
    assert_same_dirs(&rel.env.path("v1"), &c.join("trees/1"));
    let st = json(&ts(&c, ["status", "--json"]));
    assert_eq!(st["downloads"]["partial"], 0, "{st}");

    // --downloads: a fresh one goes too; the kept index stays, the trees and pool as they were.
    fs::write(&fresh, &delta[..1000]).unwrap();
    let trees = listing(&c.join("trees"));
    let pool = listing(&c.join("pool"));
    ts(&c, ["gc", "--downloads"])
        .success()
        .stdout_has("1 partial download(s) (1000 bytes)");
    assert!(!fresh.exists());
    assert!(dl.join("index.stable.toml").exists());
    assert!(diff_listings(&trees, &listing(&c.join("trees"))).is_empty());
    assert!(diff_listings(&pool, &listing(&c.join("pool"))).is_empty());
    ts(&c, ["verify"]).success();
}

/// `scripts/install-boot.sh --update` installs the update units beside the boot units (with
/// `--sysv`, the cron line), with the binary's and the defaults file's paths written in; what
/// it installed updates a machine whose root and config only the defaults file names.
/// Without `--update` it installs neither.
#[test]
fn install_boot_installs_the_update_units_and_cron_line() {
    use std::os::unix::fs::PermissionsExt;
    if skip_unless_root() {
        return;
    }
    let rel = Rel::new();
    rel.publish("1", &rel.tree(1, 0), &[]).success();
    let config = rel.config(
        "units.toml",
        &format!("[update]\nurl = \"{}\"\n", rel.file_url()),
    );
    let script = Path::new(REPO).join("scripts/install-boot.sh");
    let install = |args: &[&str], dest: &Path, defaults: &Path, root: &Path| {
        let mut c = Command::new(&script);
        c.args(["--bin", BIN])
            .args(args)
            .arg("--dest")
            .arg(dest)
            .arg("--defaults")
            .arg(defaults)
            .arg("--root")
            .arg(root)
            .arg("--config")
            .arg(&config);
        run(&mut c)
    };
    let boot_units = [
        "treeswap-boot.service",
        "treeswap-mark-good.service",
        "treeswap-mark-good.timer",
    ];
    let update_units = ["treeswap-update.service", "treeswap-update.timer"];

    let plain = rel.env.path("plain");
    let r = install(&[], &plain, &rel.env.path("d0"), &rel.env.path("r0"));
    assert!(
        !r.success().stdout().contains("treeswap-update"),
        "{}",
        r.stdout()
    );
    let mut got: Vec<String> = names(&plain).iter().map(|n| show(n)).collect();
    got.sort();
    assert_eq!(got, boot_units);

    let a = rel.client("a");
    let units = rel.env.path("units");
    let defaults = rel.env.path("defaults-a");
    install(&["--update"], &units, &defaults, &a)
        .success()
        .stdout_has("treeswap-update.timer");
    for u in boot_units.iter().chain(&update_units) {
        let text = fs::read_to_string(units.join(u)).unwrap();
        assert!(!text.contains("/usr/sbin/treeswap"), "{u}: {text}");
        assert!(!text.contains("/etc/default/treeswap"), "{u}: {text}");
        let mode = fs::metadata(units.join(u)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o644, "{u}");
    }
    if Path::new("/usr/bin/systemd-analyze").exists() {
        let mut c = Command::new("systemd-analyze");
        c.args(["verify", "--man=no"]);
        for u in boot_units.iter().chain(&update_units) {
            c.arg(units.join(u));
        }
        let r = run(&mut c);
        r.success();
        assert!(r.stderr().trim().is_empty(), "{}", r.stderr());
    }
    // The service's command, with the environment its EnvironmentFile gives.
    let service = fs::read_to_string(units.join("treeswap-update.service")).unwrap();
    let value = |key: &str| -> String {
        service
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key}="))
            .to_owned()
    };
    assert_eq!(value("EnvironmentFile"), format!("-{}", defaults.display()));
    let argv: Vec<String> = value("ExecStart")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert_eq!(argv[0], BIN);
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(format!(
            "set -a; . {}; set +a; exec \"$@\"",
            defaults.display()
        ))
        .arg("sh")
        .args(&argv)
        .env_remove("TREESWAP_ROOT")
        .env_remove("TREESWAP_CONFIG");
    run(&mut c).success();
    assert_eq!(current(&a), "1");

    // --sysv --update: the init script and the cron line, which reads the defaults file.
    let b = rel.client("b");
    let initd = rel.env.path("init.d");
    let crond = rel.env.path("cron.d");
    let defaults = rel.env.path("defaults-b");
    let mut args = vec!["--sysv", "--update", "--cron-dest"];
    let crond_s = crond.to_str().unwrap().to_owned();
    args.push(&crond_s);
    install(&args, &initd, &defaults, &b)
        .success()
        .stdout_has("cron runs");
    let init = fs::read_to_string(initd.join("treeswap")).unwrap();
    assert!(
        init.contains(&format!("TREESWAP=${{TREESWAP:-{BIN}}}")),
        "{init}"
    );
    assert!(
        init.contains(&format!("${{TREESWAP_DEFAULTS:-{}}}", defaults.display())),
        "{init}"
    );
    let cron = fs::read_to_string(crond.join("treeswap-update")).unwrap();
    assert!(!cron.contains("/usr/sbin/treeswap"), "{cron}");
    assert!(!cron.contains("/etc/default/treeswap"), "{cron}");
    let mode = fs::metadata(crond.join("treeswap-update"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o644);
    let line = cron.lines().find(|l| !l.starts_with('#')).unwrap();
    let fields: Vec<&str> = line.splitn(7, ' ').collect();
    assert_eq!(fields[5], "root", "{line}");
    for _ in 0..2 {
        let r = run(Command::new("sh")
            .arg("-c")
            .arg(fields[6])
            .env("TREESWAP_UPDATE_SPLAY", "0")
            .env_remove("TREESWAP_ROOT")
            .env_remove("TREESWAP_CONFIG"));
        r.success();
        assert_eq!(r.stdout(), "", "cron mails what it prints");
        assert_eq!(r.stderr(), "", "cron mails what it prints");
    }
    assert_eq!(current(&b), "1");
    // --sysv without --update: no cron line.
    let crond2 = rel.env.path("cron2.d");
    let crond2_s = crond2.to_str().unwrap().to_owned();
    install(
        &["--sysv", "--cron-dest", &crond2_s],
        &rel.env.path("init2.d"),
        &rel.env.path("d2"),
        &rel.env.path("r2"),
    )
    .success();
    assert!(!crond2.exists());
}

// --- review of publish/update (issue 18 review): regression tests ---

/// [`assert_unchanged`], but for the serial of the index the refused run accepted (review
/// 6: it is recorded before the download, so that a download cut short cannot be followed
/// by an older index): the state file differs only in its `[serials]` table.
#[track_caller]
fn assert_unchanged_but_serial(before: &(Listing, String), root: &Path) {
    let mut after = root_state(root);
    let mut before = (before.0.clone(), before.1.clone());
    before.0.remove(&b"state.toml"[..]);
    after.0.remove(&b"state.toml"[..]);
    let d = diff_listings(&before.0, &after.0);
    assert!(d.is_empty(), "the root changed:\n{}", d.join("\n"));
    let strip = |s: &str| -> String {
        let mut out = String::new();
        let mut skip = false;
        for l in s.lines() {
            if l.starts_with('[') {
                skip = l == "[serials]";
            }
            if !skip {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    };
    // (A root that had no state file has one now, with only its header and the serial.)
    let norm = |s: &str| -> Vec<String> {
        strip(s)
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with("format = "))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(norm(&before.1), norm(&after.1), "the state file changed");
}

/// Runs `c` and waits at most `limit` for it (killed and failed past it): a refusal that
/// must not hang.
#[track_caller]
fn run_within(c: &mut Command, limit: Duration) -> std::process::Output {
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after {limit:?}; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// The index served at serial `serial` with another serial (re-signed by the release key).
fn with_serial(rel: &Rel, text: &[u8], serial: u64) {
    let dir = rel.repo.join("stable");
    let t = String::from_utf8(text.to_vec()).unwrap();
    let line = t
        .lines()
        .find(|l| l.starts_with("serial = "))
        .unwrap()
        .to_owned();
    fs::write(
        dir.join("index.toml"),
        t.replace(&line, &format!("serial = {serial}")),
    )
    .unwrap();
    minisign_sign(&rel.secret, &dir.join("index.toml"));
}

/// Review 1: with no trusted keys, `update` refuses (exit 10) rather than trusting the
/// network; `--insecure` (development only) takes an unsigned repository.
#[test]
fn update_without_trusted_keys_refuses_unless_insecure() {
    if skip_unless_root() {
        return;
    }
    let rel = Rel::new();
    let url = rel.file_url();
    let mut c = ts_cmd();
    c.arg("--root")
        .arg(&rel.server)
        .args(["publish", "--channel", "stable", "--version", "1"])
        .arg("--repo")
        .arg(&rel.repo)
        .arg("--from-dir")
        .arg(rel.tree(1, 0));
    run(&mut c).success();
    fs::write(rel.env.path("nokeys.toml"), "").unwrap();
    let client = rel.client("client");
    let before = root_state(&client);
    for args in [&[][..], &["--check"], &["--dry-run"]] {
        rel.update(&client, "nokeys.toml", &url, args)
            .exit(10)
            .one_line_error()
            .stderr_has("[trust] public_keys");
        assert_unchanged(&before, &client);
    }
    rel.update(&client, "nokeys.toml", &url, &["--insecure"])
        .success()
        .stderr_has("--insecure");
    assert_eq!(current(&client), "1");
}

/// Review 3: a signed index whose latest is an older installed version does not switch the
/// machine back (exit 11) unless `--allow-downgrade`.
#[test]
fn update_refuses_to_switch_back_to_an_older_version() {
    if skip_unless_root() {
        return;
    }
    let rel = Rel::new();
    let url = rel.file_url();
    let dir = rel.repo.join("stable");
    rel.publish("1", &rel.tree(1, 0), &[]).success();
    let one = fs::read(dir.join("index.toml")).unwrap();
    let client = rel.client("client");
    rel.update(&client, "client.toml", &url, &[]).success();
    rel.publish("2", &rel.tree(2, 0), &[]).success();
    rel.update(&client, "client.toml", &url, &[]).success();
    assert_eq!(current(&client), "2");
    with_serial(&rel, &one, 3);
    let before = root_state(&client);
    for args in [&[][..], &["--check"], &["--dry-run"]] {
        rel.update(&client, "client.toml", &url, args)
            .exit(11)
            .one_line_error()
            .stderr_has("--allow-downgrade");
        assert_unchanged(&before, &client);
    }
    rel.update(&client, "client.toml", &url, &["--allow-downgrade"])
        .success();
    assert_eq!(current(&client), "1");
}

/// Review 6: the serial of an index that passed its checks is recorded before the download,
/// so a run cut short cannot be followed by a replay of the older index.
#[test]
fn the_serial_is_recorded_before_the_download() {
    if skip_unless_root() {
        return;
    }
    let rel = Rel::new();
    let url = rel.file_url();
    let dir = rel.repo.join("stable");
    rel.publish("1", &rel.tree(1, 0), &[]).success();
    let one = (
        fs::read(dir.join("index.toml")).unwrap(),
        fs::read(dir.join("index.toml.minisig")).unwrap(),
    );
    rel.publish("2", &rel.tree(2, 0), &[]).success();
    // The download of 2 fails (the delta files are gone).
    fs::remove_dir_all(dir.join("deltas/2")).unwrap();
    let client = rel.client("client");
    rel.update(&client, "client.toml", &url, &[]).failure();
    assert!(client.join("current").symlink_metadata().is_err());
    // The serial-1 index, still valid, is a rollback now.
    fs::write(dir.join("index.toml"), &one.0).unwrap();
    fs::write(dir.join("index.toml.minisig"), &one.1).unwrap();
    let before = root_state(&client);
    rel.update(&client, "client.toml", &url, &[])
        .exit(13)
        .one_line_error();
    assert_unchanged(&before, &client);
}

/// Review 2: `publish` re-signs and carries forward only what it published itself: an
/// index changed on disk (without the key) or a carried delta file changed is refused.
#[test]
fn publish_refuses_a_repository_changed_behind_its_back() {
    if skip_unless_root() {
        return;
    }
    let rel = Rel::new();
    let dir = rel.repo.join("stable");
    rel.publish("1", &rel.tree(1, 0), &[]).success();
    rel.publish("2", &rel.tree(2, 0), &[]).success();
    let good = (
        fs::read(dir.join("index.toml")).unwrap(),
        fs::read(dir.join("index.toml.minisig")).unwrap(),
    );
    let refresh = || rel.refresh();
    // latest moved back to 1 by someone who can write the web root, not sign.
    let edited = String::from_utf8(good.0.clone())
        .unwrap()
        .replace("latest = \"2\"", "latest = \"1\"");
    assert_ne!(edited.as_bytes(), &good.0[..]);
    fs::write(dir.join("index.toml"), &edited).unwrap();
    refresh()
        .exit(10)
        .one_line_error()
        .stderr_has("not signed by the publishing key");
    assert_eq!(fs::read(dir.join("index.toml")).unwrap(), edited.as_bytes());
    // Signed, but by another key.
    let (_, other) = minisign_keypair(&rel.env, "other");
    minisign_sign(&other, &dir.join("index.toml"));
    refresh().exit(10).one_line_error();
    // Unsigned.
    fs::remove_file(dir.join("index.toml.minisig")).unwrap();
    refresh().exit(10).one_line_error();
    // The publisher's own pair is refreshed.
    fs::write(dir.join("index.toml"), &good.0).unwrap();
    fs::write(dir.join("index.toml.minisig"), &good.1).unwrap();
    refresh().success().stdout_has("serial 3");
    // A delta file the index names, changed: not carried into the next index.
    let served = rel.index();
    let delta = dir.join("deltas/2/empty.delta");
    let mut bytes = fs::read(&delta).unwrap();
    bytes[100] ^= 0xff;
    fs::write(&delta, &bytes).unwrap();
    rel.publish("3", &rel.tree(3, 0), &[])
        .failure()
        .one_line_error()
        .stderr_has("sha256");
    assert_eq!(rel.index(), served);
}

/// Review 2: `publish` never writes through a symlink or into a FIFO planted in the
/// repository: not at a delta's name, not at a directory on the way to it.
#[test]
fn publish_never_writes_through_a_planted_symlink() {
    if skip_unless_root() {
        return;
    }
    let rel = Rel::new();
    let dir = rel.repo.join("stable");
    rel.publish("1", &rel.tree(1, 0), &[]).success();
    let v2 = rel.tree(2, 0);
    let victim = rel.env.path("victim");
    fs::write(&victim, "precious\n").unwrap();
    fs::create_dir_all(dir.join("deltas/2")).unwrap();
    std::os::unix::fs::symlink(&victim, dir.join("deltas/2/empty.delta")).unwrap();
    let served = rel.index();
    rel.publish("2", &v2, &[])
        .failure()
        .one_line_error()
        .stderr_has("not a regular file");
    assert_eq!(fs::read_to_string(&victim).unwrap(), "precious\n");
    assert_eq!(rel.index(), served);
    fs::remove_file(dir.join("deltas/2/empty.delta")).unwrap();
    // (The delta from 1 written before it is not named by any index: the next publish
    // prunes it.)
    fs::remove_dir_all(dir.join("deltas/2")).unwrap();
    // A symlinked directory.
    let elsewhere = rel.env.path("elsewhere");
    fs::create_dir_all(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, dir.join("deltas/2")).unwrap();
    rel.publish("2", &v2, &[]).failure().one_line_error();
    assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 0);
    assert_eq!(rel.index(), served);
    fs::remove_file(dir.join("deltas/2")).unwrap();
    // A FIFO at the name: refused at once, not written to (which would block).
    fs::create_dir_all(dir.join("deltas/2")).unwrap();
    let st = Command::new("mkfifo")
        .arg(dir.join("deltas/2/empty.delta"))
        .status()
        .unwrap();
    assert!(st.success());
    let mut c = ts_cmd();
    c.arg("--root")
        .arg(&rel.server)
        .args(["publish", "--channel", "stable", "--version", "2"])
        .arg("--repo")
        .arg(&rel.repo)
        .arg("--from-dir")
        .arg(&v2)
        .arg("--sign")
        .arg(&rel.secret);
    let out = run_within(&mut c, Duration::from_secs(60));
    assert!(!out.status.success());
    assert_eq!(rel.index(), served);
    fs::remove_file(dir.join("deltas/2/empty.delta")).unwrap();
    // Nothing planted: published.
    rel.publish("2", &v2, &[]).success();
}

/// Review 5: an https repository that redirects to plain http is refused, not followed.
#[test]
fn https_never_falls_back_to_http() {
    if skip_unless_root() {
        return;
    }
    let rel = Rel::new();
    rel.publish("1", &rel.tree(1, 0), &[]).success();
    let http = Nginx::start(&rel.env, "nginx-plain", &rel.repo, None);
    let (ca, cert, key) = private_ca(&rel.env);
    // An https server whose every answer is a redirect to the http one.
    let https = Nginx::start(&rel.env, "nginx-redirect", &rel.repo, Some((&cert, &key)));
    let conf = https.dir.join("nginx.conf");
    let text = fs::read_to_string(&conf).unwrap().replace(
        "    root ",
        &format!(
            "    location / {{ return 301 http://127.0.0.1:{}$request_uri; }}\n    root ",
            http.port
        ),
    );
    drop(https);
    fs::write(&conf, text).unwrap();
    let https = restart_nginx(rel.env.path("nginx-redirect"));
    rel.config("ca.toml", &format!("[update]\nca = \"{}\"\n", ca.display()));
    let a = rel.client("a");
    let before = root_state(&a);
    rel.update(&a, "ca.toml", &https.url(), &[])
        .failure()
        .one_line_error();
    assert_unchanged(&before, &a);
    assert!(http.requests("/stable/index.toml").is_empty());
}

/// Starts nginx again in `dir` with the config there (an edited one of [`Nginx::start`]).
fn restart_nginx(dir: PathBuf) -> Nginx {
    let conf = fs::read_to_string(dir.join("nginx.conf")).unwrap();
    let port: u16 = conf
        .split("listen 127.0.0.1:")
        .nth(1)
        .unwrap()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let child = Command::new("nginx")
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-p")
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nginx did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Nginx {
        child,
        port,
        dir,
        https: conf.contains(" ssl;"),
    }
}

/// A server of the test's own that trickles: for the index, one byte every 200 ms (never
/// a stall); for a delta, the right byte at the offset asked for, then it closes (every
/// connection is progress).
fn trickle_server(repo: PathBuf) -> (u16, Arc<AtomicU64>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let conns = Arc::new(AtomicU64::new(0));
    let n = conns.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { break };
            n.fetch_add(1, Ordering::Relaxed);
            let repo = repo.clone();
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && c.read(&mut b).is_ok_and(|n| n == 1) {
                    head.push(b[0]);
                }
                let text = String::from_utf8_lossy(&head).into_owned();
                let path = text.split(' ').nth(1).unwrap_or("/").to_owned();
                let body = fs::read(repo.join(path.trim_start_matches('/'))).unwrap_or_default();
                if path.ends_with(".delta") {
                    let from: usize = text
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("range: bytes=")
                                .map(str::to_owned)
                        })
                        .and_then(|r| r.trim_end_matches('-').parse().ok())
                        .unwrap_or(0);
                    let _ = write!(
                        c,
                        "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {from}-{}/{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len() - 1,
                        body.len(),
                        body.len() - from
                    );
                    let _ = c.write_all(&body[from..from + 1]);
                } else {
                    let _ = write!(
                        c,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let mut wrote = 0;
                    let trickle = path.ends_with("index.toml");
                    for b in &body {
                        if c.write_all(&[*b]).is_err() {
                            break;
                        }
                        wrote += 1;
                        if trickle && wrote > 10 {
                            std::thread::sleep(Duration::from_millis(200));
                        }
                    }
                }
            });
        }
    });
    (port, conns)
}

/// Review 4: a server that keeps a transfer barely alive cannot hold the writer's lock for
/// ever: an index that trickles in hits its overall time limit; a delta served a byte per
/// connection uses up the source's attempts; the update unit has a start timeout.
#[test]
fn a_trickling_server_cannot_hold_the_lock() {
    if skip_unless_root() {
        return;
    }
    let rel = Rel::new();
    rel.publish("1", &rel.tree(1, 200_000), &[]).success();
    rel.config("fast.toml", "[update]\nstall_timeout = 1\nretries = 2\n");
    let (port, conns) = trickle_server(rel.repo.clone());
    let url = format!("http://127.0.0.1:{port}");
    let a = rel.client("a");
    let before = root_state(&a);
    let t = Instant::now();
    let out = run_within(
        &mut rel.update_cmd(&a, "fast.toml", &url, &[]),
        Duration::from_secs(40),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("index.toml"), "{err}");
    eprintln!("a trickling index: refused after {:?}", t.elapsed());
    assert_unchanged(&before, &a);
    // The index whole and fast (from nginx), the delta a byte per connection (the test's).
    let nginx = Nginx::start(&rel.env, "nginx-index", &rel.repo, None);
    let a = rel.client("b");
    rel.config(
        "trickle.toml",
        &format!("[update]\nstall_timeout = 1\nretries = 2\nmirrors = [\"{url}\"]\n"),
    );
    let c0 = conns.load(Ordering::Relaxed);
    let t = Instant::now();
    // The mirror is dropped; nginx serves the rest.
    let out = run_within(
        &mut rel.update_cmd(&a, "trickle.toml", &nginx.url(), &[]),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(current(&a), "1");
    let made = conns.load(Ordering::Relaxed) - c0;
    eprintln!(
        "a byte per connection: dropped after {made} connections, {:?}",
        t.elapsed()
    );
    assert!(made < 1000, "{made} connections");
    let unit =
        fs::read_to_string(Path::new(REPO).join("scripts/boot/treeswap-update.service")).unwrap();
    assert!(unit.contains("\nTimeoutStartSec="), "{unit}");
}
/// Review 7: a new index cut short (a crash while it was written) is not put in place by the
/// next publish: the old pair stands, and is refreshed.
#[test]
fn publish_drops_a_partial_new_index() {
    if skip_unless_root() {
        return;
    }
    let rel = Rel::new();
    let dir = rel.repo.join("stable");
    rel.publish("1", &rel.tree(1, 0), &[]).success();
    rel.publish("2", &rel.tree(2, 0), &[]).success();
    let text = rel.index();
    // The new index half written; the new signature complete (renamed, or not yet).
    for sig_renamed in [false, true] {
        fs::write(dir.join(".index.toml.new"), &text[..text.len() / 2]).unwrap();
        if !sig_renamed {
            fs::copy(
                dir.join("index.toml.minisig"),
                dir.join(".index.toml.minisig.new"),
            )
            .unwrap();
        }
        rel.refresh().success();
        assert!(rel.index().contains("latest = \"2\""));
        assert!(!dir.join(".index.toml.new").exists());
        assert!(!dir.join(".index.toml.minisig.new").exists());
    }
    let client = rel.client("client");
    rel.update(&client, "client.toml", &rel.file_url(), &[])
        .success();
    assert_eq!(current(&client), "2");
}
/// Review 9: a damaged kept signature (the cache behind an HTTP 304) is not final: the
/// index and its signature are fetched again, unconditionally, once.
#[test]
fn a_bad_cached_signature_is_fetched_again() {
    if skip_unless_root() {
        return;
    }
    let rel = Rel::new();
    rel.publish("1", &rel.tree(1, 0), &[]).success();
    let http = Nginx::start(&rel.env, "nginx-cache", &rel.repo, None);
    let a = rel.client("a");
    rel.update(&a, "client.toml", &http.url(), &[]).success();
    let sig = a.join("downloads/index.stable.toml.minisig");
    assert!(sig.exists());
    let mut bytes = fs::read(&sig).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 1;
    fs::write(&sig, &bytes).unwrap();
    rel.update(&a, "client.toml", &http.url(), &[]).exit(4);
    // (nginx logs a request once it is done with it, which may be after the client is.)
    let statuses = || -> Vec<u16> {
        http.requests("/stable/index.toml")
            .iter()
            .map(|r| r.0)
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while statuses().len() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(statuses(), [200, 304, 200], "{:?}", statuses());
    assert_ne!(fs::read(&sig).unwrap(), bytes);
}
/// Review 8: a signature by the release key over other bytes of another kind (a delta's
/// trusted comment) is not an index's signature.
#[test]
fn an_index_signed_as_something_else_is_refused() {
    if skip_unless_root() {
        return;
    }
    let rel = Rel::new();
    let url = rel.file_url();
    let dir = rel.repo.join("stable");
    rel.publish("1", &rel.tree(1, 0), &[]).success();
    minisign_sign_as(
        &rel.secret,
        &dir.join("index.toml"),
        "treeswap delta 0 -> 1",
    );
    let client = rel.client("client");
    let before = root_state(&client);
    rel.update(&client, "client.toml", &url, &[])
        .exit(10)
        .one_line_error()
        .stderr_has("treeswap release index");
    assert_unchanged(&before, &client);
    minisign_sign(&rel.secret, &dir.join("index.toml"));
    rel.update(&client, "client.toml", &url, &[]).success();
}
/// Review 2: `publish --refresh` prunes only inside the repository: a `deltas` directory
/// replaced by a symlink is refused, and nothing it points at is removed.
#[test]
fn refresh_never_prunes_through_a_symlink() {
    if skip_unless_root() {
        return;
    }
    let rel = Rel::new();
    let dir = rel.repo.join("stable");
    rel.publish("1", &rel.tree(1, 0), &[]).success();
    let elsewhere = rel.env.path("elsewhere");
    fs::create_dir_all(&elsewhere).unwrap();
    fs::write(elsewhere.join("precious"), "precious\n").unwrap();
    fs::rename(dir.join("deltas"), rel.env.path("deltas-moved")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, dir.join("deltas")).unwrap();
    rel.refresh().failure().one_line_error();
    assert_eq!(
        fs::read_to_string(elsewhere.join("precious")).unwrap(),
        "precious\n"
    );
}
// --- end of review regression tests ---

/// Noticed in issue 18's closing note: a directory someone left in `downloads/` made every
/// `update` fail (it was removed as a stale file), and a `downloads/` that is a symlink was
/// followed, so its target's files were treated as treeswap's. Now a directory is left with
/// a warning, and a symlinked `downloads/` is refused with everything it points to intact.
#[test]
fn odd_entries_in_downloads() {
    if skip_unless_root() {
        return;
    }
    let rel = Rel::new();
    let url = rel.file_url();
    rel.publish("1", &rel.tree(1, 0), &[]).success();
    let a = rel.client("a");
    fs::create_dir_all(a.join("downloads/left-by-hand")).unwrap();
    fs::write(a.join("downloads/stale.part"), "old bytes").unwrap();
    rel.update(&a, "client.toml", &url, &[])
        .success()
        .stderr_has("`downloads/left-by-hand` is not a file treeswap wrote");
    assert_eq!(current(&a), "1");
    assert!(a.join("downloads/left-by-hand").is_dir());
    assert!(!a.join("downloads/stale.part").exists());

    let b = rel.client("b");
    let elsewhere = rel.env.path("elsewhere");
    fs::create_dir_all(&elsewhere).unwrap();
    fs::write(elsewhere.join("precious"), "mine").unwrap();
    std::os::unix::fs::symlink(&elsewhere, b.join("downloads")).unwrap();
    let before = root_state(&b);
    rel.update(&b, "client.toml", &url, &[])
        .failure()
        .one_line_error()
        .stderr_has("is not a directory");
    assert_unchanged(&before, &b);
    assert_eq!(
        fs::read_to_string(elsewhere.join("precious")).unwrap(),
        "mine"
    );
}
