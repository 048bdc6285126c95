//! A minimal reader of `docker/Dockerfile`: its stages and the instructions the image tests check.
//! (No parser crate covers Dockerfile syntax well; this one handles what our file uses:
//! `FROM ... AS name`, line continuations, and exec-form JSON arrays.)

use std::collections::BTreeMap;

/// One build stage.
#[derive(Debug, Default, Clone)]
pub struct Stage {
    /// Base image.
    pub from: String,
    /// Every instruction of the stage as (keyword in upper case, arguments), in order.
    pub instructions: Vec<(String, String)>,
}

impl Stage {
    /// Arguments of every instruction with this keyword.
    pub fn all(&self, keyword: &str) -> Vec<&str> {
        self.instructions
            .iter()
            .filter(|(k, _)| k == keyword)
            .map(|(_, a)| a.as_str())
            .collect()
    }

    /// Arguments of the last instruction with this keyword (the one that takes effect).
    pub fn last(&self, keyword: &str) -> Option<&str> {
        self.all(keyword).last().copied()
    }

    /// `ENTRYPOINT` in exec form, parsed.
    pub fn entrypoint(&self) -> Vec<String> {
        self.last("ENTRYPOINT")
            .map(|json| {
                serde_json::from_str(json)
                    .unwrap_or_else(|e| panic!("ENTRYPOINT {json} is not exec form: {e}"))
            })
            .unwrap_or_default()
    }

    /// Every port of every `EXPOSE`.
    pub fn exposed_ports(&self) -> Vec<u16> {
        self.all("EXPOSE")
            .iter()
            .flat_map(|a| a.split_whitespace())
            .map(|p| {
                let port = p.split('/').next().unwrap_or(p);
                port.parse().unwrap_or_else(|e| panic!("EXPOSE {p}: {e}"))
            })
            .collect()
    }

    /// `ENV key=value` settings of the stage.
    pub fn env(&self) -> BTreeMap<String, String> {
        self.all("ENV")
            .iter()
            .flat_map(|a| a.split_whitespace())
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }
}

/// Stages by name (`AS name`).
pub fn stages(text: &str) -> BTreeMap<String, Stage> {
    let mut logical = Vec::new();
    let mut pending = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && pending.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                pending.push_str(head);
                pending.push(' ');
            }
            None => {
                pending.push_str(trimmed);
                logical.push(std::mem::take(&mut pending));
            }
        }
    }
    let mut stages = BTreeMap::new();
    let mut current: Option<(String, Stage)> = None;
    for line in logical.iter().filter(|l| !l.trim().is_empty()) {
        let (keyword, args) = line
            .split_once(char::is_whitespace)
            .unwrap_or((line.as_str(), ""));
        let keyword = keyword.to_ascii_uppercase();
        let args = args.trim().to_owned();
        if keyword == "FROM" {
            if let Some((name, stage)) = current.take() {
                stages.insert(name, stage);
            }
            let words: Vec<&str> = args.split_whitespace().collect();
            let name = match words.as_slice() {
                [_, as_kw, name] if as_kw.eq_ignore_ascii_case("as") => (*name).to_owned(),
                _ => format!("stage{}", stages.len()),
            };
            current = Some((
                name,
                Stage {
                    from: words[0].to_owned(),
                    instructions: Vec::new(),
                },
            ));
        } else if let Some((_, stage)) = current.as_mut() {
            stage.instructions.push((keyword, args));
        }
    }
    if let Some((name, stage)) = current {
        stages.insert(name, stage);
    }
    stages
}
