//! Field ownership for the fake API server, the part of server-side apply reconcile relies on.
//!
//! Fields are the object's leaves (arrays count as one leaf, as for an atomic list). Each
//! manager owns the leaves it last wrote, with the operation it wrote them with. An apply sets
//! the leaves it names, removes the leaves its manager applied before and no longer names
//! (unless another manager owns them too), and conflicts with every leaf another manager owns
//! with a different value, unless forced, in which case the leaf changes hands. An update
//! (`kubectl edit`, `patch`) takes the leaves it writes without conflicts. What the fake still
//! does not model: list-map keys (a list of containers merged by name) and the schema.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

/// A leaf's path from the object's root.
pub type Path = Vec<String>;

/// Which half of an object a write addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// Everything but `status`.
    Main,
    /// `status` only (the status subresource).
    Status,
}

/// Who owns what of one object.
#[derive(Debug, Clone, Default)]
pub struct Owners {
    /// (manager, operation, scope) → leaves.
    entries: BTreeMap<(String, &'static str, Scope), BTreeSet<Path>>,
}

/// A leaf another manager holds, as a 409 cause reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The other manager.
    pub manager: String,
    /// The leaf, written `.a.b`.
    pub field: String,
}

impl Owners {
    /// Applies `patch` as `manager` to `stored` (`Null` when the object does not exist yet).
    pub fn apply(
        &mut self,
        stored: &Value,
        manager: &str,
        patch: &Value,
        scope: Scope,
        force: bool,
    ) -> Result<Value, Vec<Conflict>> {
        let wanted = leaves(patch, scope);
        let mut conflicts = Vec::new();
        for ((other, _, s), owned) in &self.entries {
            if other == manager || *s != scope {
                continue;
            }
            for (path, value) in &wanted {
                if owned.contains(path) && get(stored, path) != Some(value) {
                    conflicts.push(Conflict {
                        manager: other.clone(),
                        field: format!(".{}", path.join(".")),
                    });
                }
            }
        }
        if !conflicts.is_empty() && !force {
            return Err(conflicts);
        }
        let key = (manager.to_owned(), "Apply", scope);
        let before = self.entries.remove(&key).unwrap_or_default();
        let mut object = stored.clone();
        for dropped in before.iter().filter(|p| !wanted.contains_key(*p)) {
            if !self.owned_by_anyone(dropped, scope) {
                remove(&mut object, dropped);
            }
        }
        for (path, value) in &wanted {
            set(&mut object, path, value.clone());
        }
        self.take(&key, wanted.keys().cloned().collect());
        Ok(object)
    }

    /// Writes `changes` (a JSON merge patch) as `manager` with an update: no conflicts, the
    /// written leaves change hands.
    pub fn update(&mut self, stored: &Value, manager: &str, changes: &Value) -> Value {
        let written = leaves(changes, Scope::Main);
        let mut object = stored.clone();
        for (path, value) in &written {
            set(&mut object, path, value.clone());
        }
        let key = (manager.to_owned(), "Update", Scope::Main);
        let mut owned = self.entries.remove(&key).unwrap_or_default();
        owned.extend(written.keys().cloned());
        self.take(&key, owned);
        object
    }

    /// `metadata.managedFields` as the API server lists it (without `fieldsV1`).
    pub fn managed_fields(&self) -> Value {
        Value::Array(
            self.entries
                .keys()
                .map(|(manager, operation, scope)| {
                    let mut entry = json!({"manager": manager, "operation": operation,
                                           "apiVersion": "v1", "fieldsType": "FieldsV1"});
                    if *scope == Scope::Status {
                        entry["subresource"] = json!("status");
                    }
                    entry
                })
                .collect(),
        )
    }

    /// Gives `leaves` to `key`, taking them from every other manager of the same scope.
    fn take(&mut self, key: &(String, &'static str, Scope), leaves: BTreeSet<Path>) {
        for (other, owned) in self.entries.iter_mut() {
            if other.2 == key.2 {
                owned.retain(|p| !leaves.contains(p));
            }
        }
        self.entries.retain(|_, owned| !owned.is_empty());
        if !leaves.is_empty() {
            self.entries.insert(key.clone(), leaves);
        }
    }

    fn owned_by_anyone(&self, path: &Path, scope: Scope) -> bool {
        self.entries
            .iter()
            .any(|((_, _, s), owned)| *s == scope && owned.contains(path))
    }
}

/// The leaves of `object` a write in `scope` addresses; identity and server-set fields are not
/// fields of a manager.
pub fn leaves(object: &Value, scope: Scope) -> BTreeMap<Path, Value> {
    let mut out = BTreeMap::new();
    let Some(top) = object.as_object() else {
        return out;
    };
    for (key, value) in top {
        let addressed = match scope {
            Scope::Main => !matches!(key.as_str(), "apiVersion" | "kind" | "status"),
            Scope::Status => key == "status",
        };
        if addressed {
            collect(&mut vec![key.clone()], value, &mut out);
        }
    }
    const SERVER_SET: &[&str] = &[
        "name",
        "namespace",
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "managedFields",
    ];
    out.retain(|path, _| {
        !(path.len() == 2 && path[0] == "metadata" && SERVER_SET.contains(&path[1].as_str()))
    });
    out
}

fn collect(path: &mut Path, value: &Value, out: &mut BTreeMap<Path, Value>) {
    match value.as_object() {
        Some(map) if !map.is_empty() => {
            for (key, inner) in map {
                path.push(key.clone());
                collect(path, inner, out);
                path.pop();
            }
        }
        _ => {
            out.insert(path.clone(), value.clone());
        }
    }
}

fn get<'a>(object: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(object, |v, key| v.get(key))
}

fn set(object: &mut Value, path: &[String], value: Value) {
    let mut at = object;
    for key in &path[..path.len() - 1] {
        if !at.is_object() {
            *at = Value::Object(Map::new());
        }
        at = at
            .as_object_mut()
            .expect("an object")
            .entry(key.clone())
            .or_insert_with(|| Value::Object(Map::new()));
    }
    if !at.is_object() {
        *at = Value::Object(Map::new());
    }
    at.as_object_mut()
        .expect("an object")
        .insert(path[path.len() - 1].clone(), value);
}

/// Removes the leaf at `path` and the objects it leaves empty.
fn remove(object: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    if let Some(Value::Object(map)) = parents.iter().try_fold(&mut *object, |v, k| v.get_mut(k)) {
        map.remove(last);
        if map.is_empty() && !parents.is_empty() {
            remove(object, parents);
        }
    }
}
