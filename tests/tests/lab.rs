//! `qkdctl lab` as a new user meets it: bad flags, a reused directory, a directory in use. Each
//! misuse is refused with the reason on the terminal, and nothing is written or changed.

use std::path::Path;
use std::process::{Command, Output};

fn lab(dir: &Path, extra: &[&str]) -> Output {
    Command::new(tests::workspace_binary("qkdctl"))
        .arg("lab")
        .arg("--dir")
        .arg(dir)
        .args(extra)
        .output()
        .expect("run qkdctl lab")
}

/// Every file below `dir` with its contents, to show that a refused run changed nothing.
fn snapshot(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).expect("read file");
                out.push((path, bytes));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn bad_flags_are_refused_before_anything_is_written() {
    let root = tests::TempDir::new("lab-flags");
    for (flags, expected) in [
        (&["--preset", "nosuch"][..], "--preset nosuch: unknown link preset \"nosuch\""),
        (&["--block-bits", "0"][..], "--block-bits 0: block_bits = 0 is below 1000"),
        (&["--distance-km", "nan"][..], "--distance-km NaN: not a fibre length in km"),
        (&["--distance-km=-5"][..], "--distance-km -5: not a fibre length in km"),
    ] {
        let dir = root.0.join("lab");
        let out = lab(&dir, flags);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?} was accepted");
        assert!(stderr.contains(expected), "{flags:?}: {stderr}");
        assert!(!dir.exists(), "{flags:?} wrote {}", dir.display());
    }
}

/// An error names the path it failed on: a lab directory that cannot be made (its parent is a
/// file) is refused with that path, and the file is left as it was.
#[test]
fn a_directory_that_cannot_be_made_is_named_in_the_error() {
    let root = tests::TempDir::new("lab-path");
    let file = root.0.join("not-a-directory");
    std::fs::write(&file, b"a file").unwrap();
    let dir = file.join("lab");
    let out = lab(&dir, &["--duration-s", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "accepted: {stderr}");
    assert!(stderr.contains(&dir.display().to_string()) && stderr.contains("Not a directory"), "{stderr}");
    assert_eq!(std::fs::read(&file).unwrap(), b"a file");
}

#[test]
fn an_existing_lab_refuses_other_settings_and_a_second_lab_on_it() {
    let root = tests::TempDir::new("lab-reuse");
    let dir = root.0.join("lab");
    let first = lab(&dir, &["--block-bits", "50000", "--duration-s", "0.5"]);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    assert!(!dir.join("lab.pid").exists(), "a stopped lab leaves no PID file");
    let before = snapshot(&dir);

    // Other settings are refused, naming the recorded ones; the lab's files are untouched.
    let out = lab(&dir, &["--block-bits", "200000", "--duration-s", "0.5"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "new flags were silently applied or ignored");
    assert!(stderr.contains("--block-bits 200000 (the lab has 50000)"), "{stderr}");
    assert_eq!(snapshot(&dir), before);

    // A directory in use: its PID file names a live process (here a sleeping child).
    let mut holder = Command::new("sleep").arg("30").spawn().expect("spawn sleep");
    std::fs::write(dir.join("lab.pid"), format!("{}\n", holder.id())).expect("write pid");
    let before = snapshot(&dir);
    let out = lab(&dir, &["--duration-s", "0.5"]);
    let _ = holder.kill();
    let _ = holder.wait();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second lab started on a directory in use");
    assert!(stderr.contains(&format!("is in use by another qkdctl lab (pid {})", holder.id())), "{stderr}");
    assert_eq!(snapshot(&dir), before);
}
