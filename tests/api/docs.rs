//! The documentation is tested where it can be: the README's configuration table against
//! `config/default.toml`, and no file of the repository pointing outside it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Every setting of `config/default.toml` as `section.key` (nested tables dotted further).
fn default_settings() -> BTreeSet<String> {
    fn flatten(prefix: &str, table: &toml::Table, out: &mut BTreeSet<String>) {
        for (key, value) in table {
            let name = match prefix {
                "" => key.clone(),
                _ => format!("{prefix}.{key}"),
            };
            match value {
                toml::Value::Table(inner) => flatten(&name, inner, out),
                _ => {
                    out.insert(name);
                }
            }
        }
    }
    let path = Path::new(ROOT).join("config/default.toml");
    let text = std::fs::read_to_string(&path).expect("config/default.toml");
    let table: toml::Table = text.parse().expect("config/default.toml is TOML");
    let mut settings = BTreeSet::new();
    flatten("", &table, &mut settings);
    settings
}

/// The settings the README's configuration table names. Only the first cell of each row of
/// the `### Configuration` section counts, and only inside backticks: a full dotted key
/// (`stripe.connect_timeout_ms`), or a bare key after a dotted key of the same row, which
/// names the same section (`stripe.connect_timeout_ms`, `request_timeout_ms`).
fn readme_settings(readme: &str) -> BTreeSet<String> {
    let section = (readme.lines())
        .skip_while(|line| line.trim() != "### Configuration")
        .skip(1)
        .take_while(|line| !line.starts_with('#'));
    let mut named = BTreeSet::new();
    for row in section.filter(|line| line.starts_with('|')) {
        let first_cell = row.split('|').nth(1).unwrap_or_default();
        let mut table = None;
        for code in first_cell.split('`').skip(1).step_by(2) {
            match (code.split_once('.'), table) {
                (Some((section, _)), _) => {
                    table = Some(section);
                    named.insert(code.to_string());
                }
                (None, Some(section)) => {
                    named.insert(format!("{section}.{code}"));
                }
                (None, None) => {}
            }
        }
    }
    named
}

#[test]
fn readme_configuration_table_names_every_setting() {
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).expect("README.md");
    let named = readme_settings(&readme);
    let missing: Vec<String> = default_settings().difference(&named).cloned().collect();
    assert!(
        missing.is_empty(),
        "config/default.toml has settings the README's configuration table does not name \
         (a row's first cell, in backticks): {}",
        missing.join(", ")
    );
}

#[test]
fn the_table_rule_reads_rows_as_intended() {
    let readme = "\
| `a.x` | 1 | not in the section |
### Configuration
| setting | default | meaning |
|---|---|---|
| `stripe.connect_timeout_ms`, `request_timeout_ms` | `3000` | bounds |
| `log.format` | `pretty`, `json` | the default is not a setting |
| `orphan` | 1 | a bare key with no section before it |
## Next
| `b.y` | 1 | not in the section |
";
    let named: Vec<String> = readme_settings(readme).into_iter().collect();
    let expected = [
        "log.format",
        "stripe.connect_timeout_ms",
        "stripe.request_timeout_ms",
    ];
    assert_eq!(named, expected);
}

/// Text files a commit would carry: tracked or untracked-but-not-ignored, per git; without
/// git, every file under the root except `target/` and `.git/`.
fn repository_files() -> Vec<PathBuf> {
    let listed = Command::new("git")
        .args([
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
        ])
        .current_dir(ROOT)
        .output();
    if let Some(output) = listed.ok().filter(|o| o.status.success()) {
        let names = output.stdout.split(|&b| b == 0).filter(|n| !n.is_empty());
        return names
            .map(|name| Path::new(ROOT).join(String::from_utf8_lossy(name).as_ref()))
            .collect();
    }
    let mut files = Vec::new();
    let mut pending = vec![PathBuf::from(ROOT)];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir)
            .expect("readable directory")
            .flatten()
        {
            let path = entry.path();
            let name = entry.file_name();
            if path.is_dir()
                && !["target", ".git", "node_modules"].contains(&name.to_str().unwrap_or_default())
            {
                pending.push(path);
            } else if path.is_file() {
                files.push(path);
            }
        }
    }
    files
}

#[test]
fn no_file_points_outside_the_repository() {
    // Spelled in two pieces so that this file does not name it.
    let needle = concat!("..", "/shared");
    let mut mentions = Vec::new();
    for path in repository_files() {
        // Binary files (the screenshots) and files deleted from the work tree are skipped.
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        for (number, line) in text.lines().enumerate() {
            if line.contains(needle) {
                let relative = path.strip_prefix(ROOT).unwrap_or(&path);
                mentions.push(format!("{}:{}", relative.display(), number + 1));
            }
        }
    }
    assert!(
        mentions.is_empty(),
        "the repository must stand alone, but these lines mention `{needle}`: {}",
        mentions.join(", ")
    );
}
