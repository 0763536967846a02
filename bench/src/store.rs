//! The embedded store alone, in-process (no HTTP): durable allocations per second and how many
//! operations each batch and each sync carried, as concurrency grows, against the disk's raw
//! sync rate measured in the same run, in the same directory. Two designs of the same store
//! run side by side: the journal (the default) and a durable redb commit per batch
//! (`checkpoint_bytes: 0` and no checkpoint beside the writer: every batch is a durable commit,
//! which is how the store worked before).

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use idempotency_server::store::{Allocate, AllocateOutcome, Store};
use idempotency_server::{EmbeddedOptions, EmbeddedStore};

use crate::median;

pub const CONCURRENCY: [usize; 9] = [1, 2, 4, 8, 16, 32, 64, 128, 256];

#[derive(Clone, Copy, Debug, Default)]
pub struct Point {
    pub concurrency: usize,
    pub ops: f64,
    pub per_batch: f64,
    pub per_sync: f64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Design {
    Journal,
    CommitPerBatch,
}

impl Design {
    pub fn name(self) -> &'static str {
        match self {
            Design::Journal => "journal (overlapped sync)",
            Design::CommitPerBatch => "durable redb commit per batch",
        }
    }
}

/// `concurrency` tasks allocating fresh keys for `seconds`.
async fn point(
    dir_in: &Path,
    design: Design,
    concurrency: usize,
    seconds: f64,
) -> anyhow::Result<Point> {
    let dir = tempfile::tempdir_in(dir_in)?;
    let mut options = EmbeddedOptions::new(dir.path());
    if design == Design::CommitPerBatch {
        options.checkpoint_bytes = 0;
        options.background_checkpoints = false;
    }
    let store = Arc::new(tokio::task::spawn_blocking(move || EmbeddedStore::open(options)).await??);
    let before = store.stats();
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..concurrency {
        let (store, done) = (store.clone(), done.clone());
        tasks.spawn(async move {
            let mut i = 0u64;
            while Instant::now() < until {
                i += 1;
                let request = Allocate {
                    key: format!("w{worker}-{i}"),
                    fingerprint: None,
                    lease: Duration::from_secs(60),
                };
                match store.allocate(request).await? {
                    AllocateOutcome::Allocated { .. } => done.fetch_add(1, Ordering::Relaxed),
                    other => anyhow::bail!("a fresh key answered {other:?}"),
                };
            }
            anyhow::Ok(())
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let after = store.stats();
    store.shutdown().await?;
    let ops = done.load(Ordering::Relaxed) as f64;
    let commits = (after.commits - before.commits).max(1) as f64;
    let syncs = (after.syncs - before.syncs).max(1) as f64;
    Ok(Point {
        concurrency,
        ops: ops / elapsed,
        per_batch: ops / commits,
        per_sync: ops / syncs,
    })
}

/// The disk's raw sync rate with `files` syncs in flight at once: as many threads, each
/// writing 4 KiB into a pre-written file of its own and syncing it, in a loop; the sum of
/// their rates. With one file, what one sync per operation could do at best; with more, what
/// a store that overlapped its syncs could draw from the disk (the journal keeps one in
/// flight).
pub fn raw_sync_rate(dir_in: &Path, seconds: f64, files: usize) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir_in(dir_in)?;
    let paths: Vec<_> = (0..files)
        .map(|i| dir.path().join(format!("sync{i}")))
        .collect();
    std::thread::scope(|scope| {
        let loops: Vec<_> = paths
            .iter()
            .map(|path| scope.spawn(move || sync_loop(path, seconds)))
            .collect();
        loops
            .into_iter()
            .map(|l| {
                l.join()
                    .map_err(|_| anyhow::anyhow!("a sync loop panicked"))?
            })
            .sum()
    })
}

/// Syncs per second of one file: a 4 KiB write and one `fdatasync`, in a loop.
fn sync_loop(path: &Path, seconds: f64) -> anyhow::Result<f64> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    file.write_all_at(&vec![0u8; 1 << 20], 0)?;
    file.sync_all()?;
    let page = vec![1u8; 4096];
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed().as_secs_f64() < seconds {
        file.write_all_at(&page, (n % 256) * 4096)?;
        file.sync_data()?;
        n += 1;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

pub struct Sweep {
    pub raw_syncs: f64,
    /// The raw rate with two syncs in flight (two files, a thread each).
    pub overlapped_syncs: f64,
    pub journal: Vec<Point>,
    pub commit_per_batch: Vec<Point>,
}

/// Medians of `runs` at each concurrency; the designs and the raw sync alternate.
pub async fn sweep(dir_in: &Path, runs: usize, seconds: f64) -> anyhow::Result<Sweep> {
    let mut raw = Vec::new();
    let mut overlapped = Vec::new();
    let mut journal = Vec::new();
    let mut per_batch = Vec::new();
    for &c in &CONCURRENCY {
        let mut j = Vec::new();
        let mut b = Vec::new();
        for _ in 0..runs {
            j.push(point(dir_in, Design::Journal, c, seconds).await?);
            b.push(point(dir_in, Design::CommitPerBatch, c, seconds).await?);
            let dir = dir_in.to_owned();
            let (one, two) = tokio::task::spawn_blocking(move || {
                anyhow::Ok((
                    raw_sync_rate(&dir, seconds / 4.0, 1)?,
                    raw_sync_rate(&dir, seconds / 4.0, 2)?,
                ))
            })
            .await??;
            raw.push(one);
            overlapped.push(two);
        }
        let m = |points: &[Point]| Point {
            concurrency: c,
            ops: median(points.iter().map(|p| p.ops).collect()),
            per_batch: median(points.iter().map(|p| p.per_batch).collect()),
            per_sync: median(points.iter().map(|p| p.per_sync).collect()),
        };
        let (j, b) = (m(&j), m(&b));
        eprintln!(
            "  concurrency {c:>3}: journal {:>8.0} ops/s ({:>5.1}/batch, {:>5.1}/sync) | commit per batch {:>8.0} ops/s ({:>5.1}/batch)",
            j.ops, j.per_batch, j.per_sync, b.ops, b.per_batch
        );
        journal.push(j);
        per_batch.push(b);
    }
    Ok(Sweep {
        raw_syncs: median(raw),
        overlapped_syncs: median(overlapped),
        journal,
        commit_per_batch: per_batch,
    })
}

/// The PNG: durable operations per second against concurrency (both log scales), the two
/// designs and the disk's raw sync rate.
pub fn plot(sweep: &Sweep, path: &Path, font: &'static [u8]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    use plotters::style::register_font;
    register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| anyhow::anyhow!("the font cannot be read"))?;
    let root = BitMapBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let top = sweep
        .journal
        .iter()
        .chain(&sweep.commit_per_batch)
        .map(|p| p.ops)
        .fold(sweep.raw_syncs, f64::max)
        * 2.0;
    let bottom = sweep
        .journal
        .iter()
        .chain(&sweep.commit_per_batch)
        .map(|p| p.ops)
        .fold(sweep.raw_syncs, f64::min)
        / 2.0;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Embedded store: durable allocations per second",
            ("sans-serif", 26),
        )
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(
            (1f64..256f64).log_scale(),
            (bottom.max(1.0)..top).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc("concurrent callers")
        .y_desc("operations per second")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style(("sans-serif", 16))
        .draw()?;
    let series = |points: &[Point]| -> Vec<(f64, f64)> {
        points
            .iter()
            .map(|p| (p.concurrency as f64, p.ops))
            .collect()
    };
    let blue = RGBColor(31, 119, 180);
    let orange = RGBColor(255, 127, 14);
    let grey = RGBColor(100, 100, 100);
    chart
        .draw_series(LineSeries::new(
            series(&sweep.journal),
            blue.stroke_width(3),
        ))?
        .label(Design::Journal.name())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], blue.stroke_width(3)));
    chart.draw_series(
        series(&sweep.journal)
            .into_iter()
            .map(|p| Circle::new(p, 4, blue.filled())),
    )?;
    chart
        .draw_series(LineSeries::new(
            series(&sweep.commit_per_batch),
            orange.stroke_width(3),
        ))?
        .label(Design::CommitPerBatch.name())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], orange.stroke_width(3)));
    chart.draw_series(
        series(&sweep.commit_per_batch)
            .into_iter()
            .map(|p| Circle::new(p, 4, orange.filled())),
    )?;
    chart
        .draw_series(LineSeries::new(
            [(1.0, sweep.raw_syncs), (256.0, sweep.raw_syncs)],
            grey.stroke_width(2),
        ))?
        .label("the disk's raw fdatasync rate (one operation per sync)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], grey.stroke_width(2)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()?;
    root.present()?;
    Ok(())
}
