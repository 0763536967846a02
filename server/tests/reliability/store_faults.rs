//! Faults of the stores: Redis restarted under load (with `appendfsync always`), Redis
//! paused beyond `--store-timeout`, and the embedded store's disk full, then read-only.
//! While the store is away the backend answers 503 (the filter: 503 too); afterwards every
//! answer is right again, and no record the backend acknowledged is lost.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use idempotency_server::{Config, StoreKind};
use idempotency_tests::Mode;
use serde_json::{Value, json};

use crate::both_modes;
use crate::common::redis_server::RedisServer;
use crate::common::{Answer, Client, TestServer};
use crate::crashes::settle_and_check;
use crate::harness::{Gateway, Load, Tap, eventually};

const SERVER_ERROR: &str = "idempotency_requests_server_error_total";

/// A backend on this Redis that gives up on it after 300 ms.
async fn backend_on(redis: &RedisServer) -> TestServer {
    let url = redis.url();
    TestServer::start_with(move |c: &mut Config| {
        c.store = Some(StoreKind::Redis);
        c.redis_url = Some(url);
        c.store_timeout = Duration::from_millis(300);
    })
    .await
}

/// Redis with every write synced before it answers: what "acknowledged" means on Redis.
const DURABLE_REDIS: &[&str] = &["--appendonly", "yes", "--appendfsync", "always"];

async fn redis_restarted_under_load_loses_nothing_acknowledged(mode: Mode) {
    let mut redis = RedisServer::start_with(DURABLE_REDIS).await;
    let backend = backend_on(&redis).await;
    let tap = Tap::start(vec![backend.addr]).await;
    let gw = Gateway::start(mode, tap.addr, json!({"lease_ms": 3000})).await;
    let load = Load::new(&format!("redis-restart-{mode}"), 1000, 8);
    let (sent, ()) = load
        .run_with_fault(&gw, load.keys / 3, redis.restart())
        .await;
    let (cases, outage) = settle_and_check(&load, &gw, &tap, &sent).await;
    eprintln!(
        "{}: {} keys; Redis SIGKILLed and restarted on its AOF after {} executions: {outage} \
         answers 503; {cases:?}",
        load.tag,
        load.keys,
        load.keys / 3
    );
    gw.finish().await;
    backend.stop().await;
}

async fn redis_paused_beyond_the_store_timeout_gives_503s_then_right_answers(mode: Mode) {
    let redis = RedisServer::start_with(DURABLE_REDIS).await;
    let backend = backend_on(&redis).await;
    let tap = Tap::start(vec![backend.addr]).await;
    let gw = Gateway::start(mode, tap.addr, json!({"lease_ms": 3000})).await;
    let load = Load::new(&format!("redis-pause-{mode}"), 1000, 8);
    let (sent, ()) = load
        .run_with_fault(&gw, load.keys / 3, async {
            redis.pause();
            // Paused until the clients have seen it: 20 allocations answered 503.
            let before = gw.metric(SERVER_ERROR);
            eventually(
                "503s while Redis is paused",
                Duration::from_secs(60),
                || gw.metric(SERVER_ERROR) >= before + 20,
            )
            .await;
            redis.resume();
        })
        .await;
    let (cases, outage) = settle_and_check(&load, &gw, &tap, &sent).await;
    assert!(outage >= 20, "{outage} answers 503 while Redis was paused");
    eprintln!(
        "{}: {} keys; Redis paused (SIGSTOP) after {} executions: {outage} answers 503; \
         {cases:?}",
        load.tag,
        load.keys,
        load.keys / 3
    );
    gw.finish().await;
    backend.stop().await;
}

both_modes!(
    redis_restarted_under_load_loses_nothing_acknowledged,
    redis_paused_beyond_the_store_timeout_gives_503s_then_right_answers,
);

/// A small tmpfs mounted for the test (root only), unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Result<Tmpfs, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// A capture whose body does not compress: `n` bytes of a seeded stream, base64.
fn big_capture(tag: &str, n: usize) -> Value {
    let mut rng = crate::harness::Rng::new(tag.len() as u64 * 7919 + n as u64);
    let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
    json!({
        "response_status": 201,
        "response_body": base64::engine::general_purpose::STANDARD.encode(bytes),
        "response_headers": [{"key": "Content-Type", "value": "application/octet-stream"}]
    })
}

/// Allocates and records `key`: the record's answer (the allocation's when it failed).
async fn store_one(client: &Client, key: &str, capture: &Value) -> Answer {
    let allocated = client.allocate(json!({"idempotency_key": key})).await;
    if allocated.status != 202 {
        return allocated;
    }
    let token = allocated.lease_token();
    client
        .record(json!({"idempotency_key": key, "lease_token": token, "response": capture}))
        .await
}

/// What an allocation of a recorded key replays: its stored body.
async fn replayed_body(client: &Client, key: &str) -> Answer {
    client.allocate(json!({"idempotency_key": key})).await
}

/// Polls until a new record is accepted again (`key`, added to `stored`), then checks that
/// every record in `stored` replays intact.
async fn recovers_with_everything(client: &Client, key: &str, stored: &mut Vec<(String, Value)>) {
    let capture = big_capture(key, 1024);
    crate::common::eventually(&format!("{key}: writes succeed again"), || async {
        (store_one(client, key, &capture).await.status == 200).then_some(())
    })
    .await;
    stored.push((key.to_string(), capture));
    all_intact(client, stored, key).await;
}

async fn all_intact(client: &Client, stored: &[(String, Value)], when: &str) {
    for (key, capture) in stored {
        let a = replayed_body(client, key).await;
        assert_eq!(a.status, 200, "{key} ({when}): {}", a.text);
        assert_eq!(a.json["response"], *capture, "{key}: intact ({when})");
    }
}

/// A failure must be a 503 store-unavailable problem, never a 500 or a broken answer.
fn assert_unavailable(a: &Answer, what: &str) {
    assert_eq!(a.status, 503, "{what}: {} {}", a.status, a.text);
    a.assert_problem(503, "urn:idempotency:problem:store-unavailable");
}

fn embedded_at(dir: PathBuf) -> impl FnOnce(&mut Config) {
    move |c: &mut Config| {
        c.store = Some(StoreKind::Embedded);
        c.data_dir = dir;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_store_on_a_full_disk() {
    crate::bounded(full_disk()).await
}

async fn full_disk() {
    let fs = match Tmpfs::mount("64m") {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!(
                "SKIPPED the full-disk test: it mounts a small tmpfs, and `mount` failed \
                 ({why}); run the suite as root to include it"
            );
            return;
        }
    };
    let data = fs.path().join("data");
    // Room to give back once the disk is full: as much as the store may need to grow
    // (its journal grows 4 MiB at a time up to an 8 MiB checkpoint, redb by doubling).
    let filler = fs.path().join("filler");
    std::fs::write(&filler, vec![0u8; 32 << 20]).unwrap();
    let backend = TestServer::start_with(embedded_at(data.clone())).await;
    let client = backend.client.clone();
    let mut stored: Vec<(String, Value)> = Vec::new();

    // Full: records of 256 KiB until the disk refuses one.
    let mut full = None;
    for i in 0..400 {
        let key = format!("full-{i}");
        let capture = big_capture(&key, 256 << 10);
        let a = store_one(&client, &key, &capture).await;
        match a.status {
            200 => stored.push((key, capture)),
            _ => {
                full = Some(a);
                break;
            }
        }
    }
    let refused = full.expect("the disk filled up");
    assert_unavailable(&refused, "a write on a full disk");
    assert!(stored.len() > 10, "{} records fitted", stored.len());
    let again = store_one(&client, "while-full", &big_capture("x", 1024)).await;
    assert_unavailable(&again, "another write while full");
    eprintln!("disk full after {} records of 256 KiB", stored.len());

    // Space returns: the store serves again (without a restart), and everything it
    // acknowledged is there, byte for byte.
    std::fs::remove_file(&filler).unwrap();
    recovers_with_everything(&client, "after-full", &mut stored).await;

    // And a restart on the same data finds every acknowledged record.
    let _ = backend.stop().await;
    let backend = TestServer::start_with(embedded_at(data)).await;
    all_intact(&backend.client, &stored, "after the restart").await;
    backend.stop().await;
}

/// A small ext4 file system in a file, on a loop device, mounted with `errors=remount-ro`
/// (root only): what a server's data disk usually is. Unmounted when dropped (the loop device
/// goes with it).
struct Ext4 {
    image: PathBuf,
    mount: tempfile::TempDir,
    _dir: tempfile::TempDir,
}

fn run(command: &mut Command) -> Result<(), String> {
    let out = command.output().map_err(|e| format!("{command:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{command:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Ext4 {
    fn make() -> Result<Ext4, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let image = dir.path().join("disk.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(64 << 20))
            .map_err(|e| e.to_string())?;
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image))?;
        let fs = Ext4 {
            image,
            mount: tempfile::tempdir().map_err(|e| e.to_string())?,
            _dir: dir,
        };
        fs.mount()?;
        Ok(fs)
    }

    fn mount(&self) -> Result<(), String> {
        run(Command::new("mount")
            .args(["-o", "loop,errors=remount-ro"])
            .arg(&self.image)
            .arg(self.mount.path()))
    }

    fn path(&self) -> &Path {
        self.mount.path()
    }

    /// What the kernel does on a metadata error with `errors=remount-ro`: the file system
    /// turns read-only at once, open files or not, and stays so until it is unmounted.
    fn fail(&self) {
        let out = Command::new("findmnt")
            .args(["-n", "-o", "SOURCE"])
            .arg(self.mount.path())
            .output()
            .unwrap();
        let device = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let name = Path::new(&device)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .to_string();
        std::fs::write(format!("/sys/fs/ext4/{name}/trigger_fs_error"), "test")
            .expect("ext4's trigger_fs_error");
    }

    /// What an operator does then: unmount (once nothing holds a file open), check, mount.
    fn unmount(&self) -> Result<(), String> {
        run(Command::new("umount").arg(self.mount.path()))
    }

    fn check_and_mount(&self) {
        // Exit status 1: errors were corrected (the error the test triggered).
        let status = Command::new("e2fsck")
            .args(["-f", "-y"])
            .arg(&self.image)
            .output()
            .unwrap();
        assert!(
            matches!(status.status.code(), Some(0 | 1)),
            "e2fsck: {}",
            String::from_utf8_lossy(&status.stdout)
        );
        self.mount().unwrap();
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.mount.path())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_store_on_a_disk_that_turns_read_only() {
    crate::bounded(read_only_disk()).await
}

async fn read_only_disk() {
    let fs = match Ext4::make() {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!(
                "SKIPPED the read-only-disk test: it mounts an ext4 image on a loop device, \
                 which failed ({why}); run the suite as root to include it"
            );
            return;
        }
    };
    let data = fs.path().join("data");
    let backend = TestServer::start_with(embedded_at(data.clone())).await;
    let client = backend.client.clone();
    let mut stored: Vec<(String, Value)> = Vec::new();
    for i in 0..20 {
        let key = format!("ro-{i}");
        let capture = big_capture(&key, 16 << 10);
        let a = store_one(&client, &key, &capture).await;
        assert_eq!(a.status, 200, "{}", a.text);
        stored.push((key, capture));
    }

    // The disk turns read-only under the running server: writes are refused with 503.
    fs.fail();
    let a = store_one(&client, "while-ro", &big_capture("while-ro", 1024)).await;
    assert_unavailable(&a, "a write on a read-only disk");
    let a = store_one(&client, "while-ro-2", &big_capture("while-ro", 1024)).await;
    assert_unavailable(&a, "another write on a read-only disk");

    // The store let go of its files (it closed itself to open again): the operator can
    // unmount, check and mount the disk, and the server serves again, without a restart,
    // with everything it acknowledged.
    crate::common::eventually("the disk can be unmounted", || async {
        // Each attempt of the store to open again holds the files a moment; a request
        // meanwhile would start another one.
        fs.unmount().ok()
    })
    .await;
    fs.check_and_mount();
    recovers_with_everything(&client, "after-ro", &mut stored).await;
    backend.stop().await;
}
