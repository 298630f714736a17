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

/// One entry of the README's map: the names in its first column and the text beside them.
struct MapEntry {
    names: Vec<String>,
    text: String,
    /// Listed under `src/` (indented), rather than at the top level.
    in_src: bool,
}

/// The code block of the README's `## How it is built` section, read as a map: an entry's
/// first column runs to the first gap of two spaces; deeper-indented lines continue its text.
fn readme_map(readme: &str) -> Vec<MapEntry> {
    let block = (readme.lines())
        .skip_while(|line| line.trim() != "## How it is built")
        .skip_while(|line| !line.starts_with("```"))
        .skip(1)
        .take_while(|line| !line.starts_with("```"));
    let mut entries: Vec<MapEntry> = Vec::new();
    let mut in_src = false;
    for line in block {
        if line.trim() == "src/" {
            in_src = true;
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let (first, text) = match line.trim_start().split_once("  ") {
            Some((first, text)) => (first, text.trim()),
            None => (line.trim(), ""),
        };
        if indent > 2 || (indent == 0 && in_src && line.trim().is_empty()) {
            if let Some(last) = entries.last_mut() {
                last.text.push(' ');
                last.text.push_str(line.trim());
            }
            continue;
        }
        if indent == 0 {
            in_src = false;
        }
        entries.push(MapEntry {
            names: first.split(", ").map(|n| n.trim().to_owned()).collect(),
            text: text.to_owned(),
            in_src,
        });
    }
    entries
}

fn mentions_word(text: &str, word: &str) -> bool {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
        .map(|w| w.trim_end_matches('.'))
        .any(|w| w == word || w.strip_suffix(".rs") == Some(word))
}

/// What the README's map says and the tree holds must agree: every file and folder of
/// `src/` is named, every file of a `src/` folder is named in its folder's line (mod.rs
/// aside), and every path the map names exists.
fn map_problems(entries: &[MapEntry], root: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    let src = root.join("src");
    let mut in_tree = BTreeSet::new();
    for entry in std::fs::read_dir(&src).expect("src/").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.path().is_dir() {
            in_tree.insert(format!("{name}/"));
        } else if name.ends_with(".rs") {
            in_tree.insert(name);
        }
    }
    let mapped: BTreeSet<String> = (entries.iter().filter(|e| e.in_src))
        .flat_map(|e| e.names.iter().cloned())
        .collect();
    for missing in in_tree.difference(&mapped) {
        problems.push(format!("src/{missing} is not in the README's map"));
    }
    for gone in mapped.difference(&in_tree) {
        problems.push(format!(
            "the README's map names src/{gone}, which does not exist"
        ));
    }
    for entry in entries {
        for name in &entry.names {
            let path = if entry.in_src {
                src.join(name)
            } else {
                root.join(name)
            };
            if !entry.in_src && !path.exists() {
                problems.push(format!(
                    "the README's map names {name}, which does not exist"
                ));
            }
            let Some(folder) = name.strip_suffix('/').filter(|_| entry.in_src) else {
                continue;
            };
            let Ok(files) = std::fs::read_dir(&path) else {
                continue;
            };
            for file in files.flatten() {
                let file_name = file.file_name().to_string_lossy().into_owned();
                let Some(stem) = file_name.strip_suffix(".rs") else {
                    continue;
                };
                if stem != "mod" && !mentions_word(&entry.text, stem) {
                    problems.push(format!(
                        "src/{folder}/{file_name} is not named in the map's line for src/{folder}/"
                    ));
                }
            }
            for word in entry
                .text
                .split(|c: char| c.is_whitespace() || c == ',' || c == '(')
            {
                let word = word.trim_end_matches([')', ',', ';', ':']);
                if word.ends_with(".rs") && !path.join(word).exists() {
                    problems.push(format!(
                        "the map's line for src/{folder}/ names {word}, which does not exist"
                    ));
                }
            }
        }
    }
    problems
}

#[test]
fn the_readme_map_matches_the_tree() {
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).expect("README.md");
    let entries = readme_map(&readme);
    assert!(entries.len() > 10, "the README's map was not found");
    let problems = map_problems(&entries, Path::new(ROOT));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_map_rule_sees_a_missing_and_a_stale_name() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir_all(dir.path().join("src/store")).expect("src/store");
    for file in [
        "src/main.rs",
        "src/lib.rs",
        "src/store/mod.rs",
        "src/store/events.rs",
    ] {
        std::fs::write(dir.path().join(file), "").expect("a file");
    }
    std::fs::create_dir_all(dir.path().join("docs")).expect("docs");
    let readme = "\
## How it is built

```
src/
  main.rs, gone.rs    the binary
  store/              mod.rs (trait), tenants.rs
docs/               the docs
```
";
    let problems = map_problems(&readme_map(readme), dir.path());
    let expected = [
        "src/lib.rs is not in the README's map",
        "the README's map names src/gone.rs, which does not exist",
        "src/store/events.rs is not named in the map's line for src/store/",
        "the map's line for src/store/ names tenants.rs, which does not exist",
    ];
    assert_eq!(problems.len(), expected.len(), "{problems:?}");
    for e in expected {
        assert!(
            problems.iter().any(|p| p == e),
            "{e} missing from {problems:?}"
        );
    }
}
