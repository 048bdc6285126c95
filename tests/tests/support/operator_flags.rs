//! The flags of `sluice-operator`, read from the clap `Args` struct in `operator/src/main.rs`.
//! The struct is private to the binary, so the tests read its source: each field with
//! `#[arg(long ...)]` is a `--kebab-case` flag, with its `env = "..."` and `default_value`.

use super::read_repo_file;

/// One flag of the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flag {
    /// `--name` as typed on the command line.
    pub long: String,
    /// Environment variable that also sets it.
    pub env: Option<String>,
    /// `default_value = "..."`, when there is one.
    pub default: Option<String>,
}

/// Every long flag of `sluice-operator`.
pub fn operator_flags() -> Vec<Flag> {
    let source = read_repo_file("operator/src/main.rs");
    let body = source
        .split_once("struct Args {")
        .and_then(|(_, rest)| rest.split_once("\n}"))
        .map(|(body, _)| body)
        .expect("operator/src/main.rs defines `struct Args { ... }`");
    let mut flags = Vec::new();
    let mut attribute = String::new();
    // rustfmt may spread an attribute over several lines: collect until its closing `)]`.
    let mut in_attribute = false;
    for line in body.lines().map(str::trim) {
        if line.starts_with("#[arg(") || in_attribute {
            if !in_attribute {
                attribute.clear();
            }
            attribute.push_str(line);
            attribute.push(' ');
            in_attribute = !line.ends_with(")]");
        } else if let Some((field, _)) = line.split_once(':').filter(|_| !line.starts_with("//")) {
            let field = field.trim_start_matches("pub ").trim();
            if attribute.contains("long") {
                flags.push(Flag {
                    long: format!("--{}", field.replace('_', "-")),
                    env: quoted_after(&attribute, "env = "),
                    default: quoted_after(&attribute, "default_value = "),
                });
            }
            attribute.clear();
        }
    }
    assert!(!flags.is_empty(), "no flags found in operator/src/main.rs");
    flags
}

fn quoted_after(text: &str, key: &str) -> Option<String> {
    let rest = &text[text.find(key)? + key.len()..];
    let rest = rest.strip_prefix('"')?;
    Some(rest[..rest.find('"')?].to_owned())
}
