//! The real download path against a small HTTP server on 127.0.0.1 serving the real data sets
//! (or a corrupted or flaky view of them), and fetching from local mirror directories.
//!
//! MNIST's files are pinned by checksum, so these tests need the real ones: they are in the
//! real-data suite (`cargo xtask test-real`, which fetches MNIST and Flowers into a directory in
//! the mirror layout, `SHA256SUMS` included, and names it in `DDPM_REAL_DATA`). The Flowers mirror
//! test runs on the committed fixture.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ddpm_data::fetch::{is_fetched, FetchOptions, FetchOutcome, Source, MARKER};
use ddpm_data::{fetch, DataConfig, DataError, Dataset, DatasetSpec, Split};

/// The fetched real data sets (see the module doc); fails with one line saying how to get them.
fn shared() -> PathBuf {
    match std::env::var_os("DDPM_REAL_DATA") {
        Some(dir) if Path::new(&dir).join("mnist").is_dir() => PathBuf::from(dir),
        _ => panic!(
            "this test reads the real data sets: run it with `cargo xtask test-real` (fetches \
             MNIST and Flowers into data/; offline: set DDPM_DATA_MIRROR=DIR to a mirror)"
        ),
    }
}

/// Whether the real MNIST has its training files (upstream) or only the t10k pair (our mirror).
fn mnist_complete() -> bool {
    shared().join("mnist/train-images-idx3-ubyte.gz").is_file()
}

/// How the server misbehaves for one path.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Serve the file with one byte changed.
    Corrupt,
    /// For the first `times` requests, announce the whole body but close after `after` bytes.
    Drop { after: usize, times: usize },
}

/// One request the server saw: the path and the start of a `Range: bytes=N-` header.
#[derive(Clone, Debug, PartialEq)]
struct Seen {
    path: String,
    range: Option<u64>,
    status: u16,
}

struct Server {
    base: String,
    log: Arc<Mutex<Vec<Seen>>>,
}

impl Server {
    /// Serves the files under `root`, honouring `Range: bytes=N-`, with the given faults.
    fn start(root: PathBuf, faults: HashMap<String, Fault>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let log = Arc::new(Mutex::new(Vec::new()));
        let server_log = Arc::clone(&log);
        std::thread::spawn(move || {
            let mut drops: HashMap<String, usize> = HashMap::new();
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let _ = handle(stream, &root, &faults, &mut drops, &server_log);
            }
        });
        Server { base, log }
    }

    fn seen(&self) -> Vec<Seen> {
        self.log.lock().unwrap().clone()
    }
}

fn handle(
    mut stream: TcpStream,
    root: &Path,
    faults: &HashMap<String, Fault>,
    drops: &mut HashMap<String, usize>,
    log: &Mutex<Vec<Seen>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .to_string();
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("range") {
                let v = value
                    .trim()
                    .trim_start_matches("bytes=")
                    .trim_end_matches('-');
                range = v.parse::<u64>().ok();
            }
        }
    }
    let rel = path.trim_start_matches('/').replace("%20", " ");
    let file = root.join(&rel);
    let Ok(mut body) = std::fs::read(&file) else {
        log.lock().unwrap().push(Seen {
            path,
            range,
            status: 404,
        });
        stream.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot found",
        )?;
        return Ok(());
    };
    let fault = faults.get(&rel).copied();
    if let Some(Fault::Corrupt) = fault {
        let mid = body.len() / 2;
        body[mid] ^= 0x55;
    }
    let start = range.unwrap_or(0).min(body.len() as u64) as usize;
    let status = if range.is_some() { 206 } else { 200 };
    log.lock().unwrap().push(Seen {
        path: path.clone(),
        range,
        status,
    });
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        if status == 206 {
            "Partial Content"
        } else {
            "OK"
        },
        body.len() - start
    );
    if status == 206 {
        head.push_str(&format!(
            "Content-Range: bytes {start}-{}/{}\r\n",
            body.len() - 1,
            body.len()
        ));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    if let Some(Fault::Drop { after, times }) = fault {
        let count = drops.entry(rel.clone()).or_default();
        if *count < times {
            *count += 1;
            let end = (start + after).min(body.len());
            stream.write_all(&body[start..end])?;
            stream.flush()?;
            // Closing without the rest of the announced body.
            return stream.shutdown(std::net::Shutdown::Both);
        }
    }
    stream.write_all(&body[start..])?;
    stream.flush()
}

fn options(data_dir: &Path, source: Source) -> FetchOptions {
    FetchOptions {
        source,
        progress: false,
        backoff: Duration::from_millis(10),
        timeout: Duration::from_secs(10),
        ..FetchOptions::new(data_dir)
    }
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

const IMAGES: &str = "mnist/t10k-images-idx3-ubyte.gz";
const LABELS: &str = "mnist/t10k-labels-idx1-ubyte.gz";

#[test]
#[ignore = "real data: run with cargo xtask test-real"]
fn a_good_download_places_verified_files_and_a_second_run_is_a_no_op() {
    let server = Server::start(shared(), HashMap::new());
    let data = tempfile::tempdir().unwrap();
    let opts = options(data.path(), Source::Url(server.base.clone()));
    let report = fetch(&DatasetSpec::Mnist, &opts).unwrap();
    assert_eq!(report.outcome, FetchOutcome::Fetched);
    let complete = mnist_complete();
    let files = if complete { 4 } else { 2 };
    assert_eq!((report.files, report.complete), (files, complete));
    assert_eq!(
        report
            .notes
            .iter()
            .any(|n| n.contains("only the MNIST test split")),
        !complete,
        "{:?}",
        report.notes
    );
    for f in [IMAGES, LABELS] {
        assert_eq!(
            std::fs::read(data.path().join(f)).unwrap(),
            std::fs::read(shared().join(f)).unwrap()
        );
    }
    assert_eq!(entries(data.path()), vec!["mnist"]);
    let mut expected = vec![
        MARKER,
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ];
    if complete {
        expected.extend(["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]);
    }
    assert_eq!(entries(&data.path().join("mnist")), expected);
    // The mirror's SHA256SUMS was read and the training files were asked for (404 when absent).
    let seen = server.seen();
    assert!(seen
        .iter()
        .any(|s| s.path == "/mnist/SHA256SUMS" && s.status == 200));
    let train_status = if complete { 200 } else { 404 };
    assert!(seen
        .iter()
        .any(|s| s.path == "/mnist/train-images-idx3-ubyte.gz" && s.status == train_status));

    let requests = seen.len();
    let again = fetch(&DatasetSpec::Mnist, &opts).unwrap();
    assert_eq!(again.outcome, FetchOutcome::AlreadyPresent);
    assert_eq!(
        server.seen().len(),
        requests,
        "a second run makes no request"
    );
    assert!(is_fetched(&DatasetSpec::Mnist, data.path()));

    let ds = Dataset::open(
        &DatasetSpec::Mnist,
        &DataConfig::with_root(data.path()),
        Split::Test,
    )
    .unwrap();
    assert_eq!(ds.len(), if complete { 10_000 } else { 2_000 });
}

#[test]
#[ignore = "real data: run with cargo xtask test-real"]
fn a_checksum_mismatch_is_rejected_and_leaves_nothing() {
    let faults = HashMap::from([(LABELS.to_string(), Fault::Corrupt)]);
    let server = Server::start(shared(), faults);
    let data = tempfile::tempdir().unwrap();
    let err = fetch(
        &DatasetSpec::Mnist,
        &options(data.path(), Source::Url(server.base.clone())),
    )
    .unwrap_err();
    match &err {
        DataError::ChecksumMismatch { file, expected, .. } => {
            assert_eq!(file, LABELS);
            assert_eq!(expected, "ec29112dd5afa0611ce80d1b7f02629c");
        }
        other => panic!("expected ChecksumMismatch, got {other:?}"),
    }
    assert!(err.to_string().contains("t10k-labels-idx1-ubyte.gz"));
    assert!(
        entries(data.path()).is_empty(),
        "left behind: {:?}",
        entries(data.path())
    );
    assert!(!is_fetched(&DatasetSpec::Mnist, data.path()));
}

#[test]
#[ignore = "real data: run with cargo xtask test-real"]
fn a_connection_dropped_mid_file_is_resumed_with_a_range_request() {
    let after = 500_000;
    let faults = HashMap::from([(IMAGES.to_string(), Fault::Drop { after, times: 1 })]);
    let server = Server::start(shared(), faults);
    let data = tempfile::tempdir().unwrap();
    let report = fetch(
        &DatasetSpec::Mnist,
        &options(data.path(), Source::Url(server.base.clone())),
    )
    .unwrap();
    assert_eq!(report.outcome, FetchOutcome::Fetched);
    let gets: Vec<Seen> = server
        .seen()
        .into_iter()
        .filter(|s| s.path == format!("/{IMAGES}"))
        .collect();
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert_eq!((gets[0].range, gets[1].range), (None, Some(after as u64)));
    assert_eq!(gets[1].status, 206);
    assert_eq!(
        std::fs::read(data.path().join(IMAGES)).unwrap(),
        std::fs::read(shared().join(IMAGES)).unwrap()
    );
}

#[test]
#[ignore = "real data: run with cargo xtask test-real"]
fn an_interrupted_fetch_looks_incomplete_and_the_next_run_resumes() {
    let after = 300_000;
    let faults = HashMap::from([(
        IMAGES.to_string(),
        Fault::Drop {
            after,
            times: usize::MAX,
        },
    )]);
    let flaky = Server::start(shared(), faults);
    let data = tempfile::tempdir().unwrap();
    let mut opts = options(data.path(), Source::Url(flaky.base.clone()));
    opts.retries = 1;
    let err = fetch(&DatasetSpec::Mnist, &opts).unwrap_err();
    assert!(matches!(err, DataError::Interrupted { .. }), "{err}");
    // Nothing that looks like a data set; the partial download is kept beside it.
    assert_eq!(entries(data.path()), vec![".mnist.partial"]);
    assert!(!is_fetched(&DatasetSpec::Mnist, data.path()));
    let part = data
        .path()
        .join(".mnist.partial/downloads/t10k-images-idx3-ubyte.gz.part");
    assert_eq!(std::fs::metadata(&part).unwrap().len(), 2 * after as u64);

    let good = Server::start(shared(), HashMap::new());
    opts.source = Source::Url(good.base.clone());
    fetch(&DatasetSpec::Mnist, &opts).unwrap();
    let gets: Vec<Seen> = good
        .seen()
        .into_iter()
        .filter(|s| s.path == format!("/{IMAGES}"))
        .collect();
    assert_eq!(
        gets.iter().map(|s| s.range).collect::<Vec<_>>(),
        vec![Some(2 * after as u64)]
    );
    assert_eq!(entries(data.path()), vec!["mnist"]);
    assert_eq!(
        std::fs::read(data.path().join(IMAGES)).unwrap(),
        std::fs::read(shared().join(IMAGES)).unwrap()
    );
}

#[test]
#[ignore = "real data: run with cargo xtask test-real"]
fn a_404_is_reported_clearly_and_not_retried() {
    let empty = tempfile::tempdir().unwrap();
    let server = Server::start(empty.path().to_path_buf(), HashMap::new());
    let data = tempfile::tempdir().unwrap();
    let err = fetch(
        &DatasetSpec::Mnist,
        &options(data.path(), Source::Url(server.base.clone())),
    )
    .unwrap_err();
    let text = err.to_string();
    match &err {
        DataError::MirrorMissing { file, .. } => assert_eq!(file, IMAGES),
        other => panic!("expected MirrorMissing, got {other:?}"),
    }
    assert!(
        text.contains("HTTP 404") && text.contains("t10k-images-idx3-ubyte.gz"),
        "{text}"
    );
    let gets = server
        .seen()
        .into_iter()
        .filter(|s| s.path == format!("/{IMAGES}"))
        .count();
    assert_eq!(gets, 1, "a 404 is not retried");
    assert!(entries(data.path()).is_empty());

    let err = fetch(
        &DatasetSpec::Cifar10,
        &options(data.path(), Source::Url(server.base.clone())),
    )
    .unwrap_err();
    assert!(
        matches!(&err, DataError::MirrorMissing { file, .. } if file == "cifar10/cifar-10-binary.tar.gz"),
        "{err}"
    );
    assert!(err.to_string().contains("HTTP 404"));
}

#[test]
#[ignore = "real data: run with cargo xtask test-real"]
fn mirror_directories_serve_mnist_and_flowers_and_name_what_is_missing() {
    let data = tempfile::tempdir().unwrap();
    let opts = options(data.path(), Source::Dir(shared()));
    let mnist = fetch(&DatasetSpec::Mnist, &opts).unwrap();
    let complete = mnist_complete();
    assert_eq!(
        (mnist.files, mnist.complete),
        (if complete { 4 } else { 2 }, complete)
    );

    let flowers = fetch(&DatasetSpec::Flowers, &opts).unwrap();
    // The two Flowers sets we know: the mirror's 4,317 images and TensorFlow's 3,670.
    let index = ddpm_data::folder::scan(&shared().join("flowers")).unwrap();
    let (total, counts) = if index.classes[2] == "rose" {
        (
            4_317,
            "daisy 764, dandelion 1052, rose 784, sunflower 733, tulip 984",
        )
    } else {
        (
            3_670,
            "daisy 633, dandelion 898, roses 641, sunflowers 699, tulips 799",
        )
    };
    assert_eq!(
        (flowers.outcome, flowers.files),
        (FetchOutcome::Fetched, total)
    );
    assert!(flowers.notes[0].contains(counts), "{:?}", flowers.notes);
    let again = fetch(&DatasetSpec::Flowers, &opts).unwrap();
    assert_eq!(again.outcome, FetchOutcome::AlreadyPresent);

    // Changing a file's size invalidates the quick check, and the next fetch replaces the set.
    let one = data
        .path()
        .join("flowers/daisy")
        .read_dir()
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::write(&one, b"oops").unwrap();
    assert!(!is_fetched(&DatasetSpec::Flowers, data.path()));
    assert_eq!(
        fetch(&DatasetSpec::Flowers, &opts).unwrap().outcome,
        FetchOutcome::Fetched
    );
    assert!(std::fs::metadata(&one).unwrap().len() > 4);

    let err = fetch(&DatasetSpec::Cifar10, &opts).unwrap_err();
    match &err {
        DataError::MirrorMissing { file, hint, .. } => {
            assert_eq!(file, "cifar10/cifar-10-binary.tar.gz");
            assert!(hint.contains("c32a1d4ab5d03f1284b67883e8d87530"), "{hint}");
        }
        other => panic!("expected MirrorMissing, got {other:?}"),
    }
    assert_eq!(entries(data.path()), vec!["flowers", "mnist"]);
}

#[test]
fn a_bad_file_in_a_flowers_mirror_is_named_and_nothing_is_placed() {
    // A small mirror over HTTP: two classes of three images each (from the committed fixture),
    // one of them damaged.
    use sha2::Digest;
    let mirror = tempfile::tempdir().unwrap();
    let src = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/flowers"));
    let mut sums = String::new();
    for class in ["daisy", "tulip"] {
        std::fs::create_dir_all(mirror.path().join("flowers").join(class)).unwrap();
        let mut names: Vec<_> = entries(&src.join(class));
        names.truncate(3);
        for name in names {
            let rel = format!("{class}/{name}");
            let bytes = std::fs::read(src.join(&rel)).unwrap();
            std::fs::write(mirror.path().join("flowers").join(&rel), &bytes).unwrap();
            let digest = hex::encode(sha2::Sha256::digest(&bytes));
            sums.push_str(&format!("{digest}  ./{rel}\n"));
        }
    }
    std::fs::write(mirror.path().join("flowers/SHA256SUMS"), &sums).unwrap();
    let good = Server::start(mirror.path().to_path_buf(), HashMap::new());
    let data = tempfile::tempdir().unwrap();
    let report = fetch(
        &DatasetSpec::Flowers,
        &options(data.path(), Source::Url(good.base.clone())),
    )
    .unwrap();
    assert_eq!(report.files, 6);

    let victim = sums
        .lines()
        .nth(4)
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .trim_start_matches("./");
    let faults = HashMap::from([(format!("flowers/{victim}"), Fault::Corrupt)]);
    let bad = Server::start(mirror.path().to_path_buf(), faults);
    let data = tempfile::tempdir().unwrap();
    let err = fetch(
        &DatasetSpec::Flowers,
        &options(data.path(), Source::Url(bad.base.clone())),
    )
    .unwrap_err();
    assert!(
        matches!(&err, DataError::ChecksumMismatch { file, algorithm: "sha256", .. } if file == &format!("flowers/{victim}")),
        "{err}"
    );
    assert!(entries(data.path()).is_empty());
}
