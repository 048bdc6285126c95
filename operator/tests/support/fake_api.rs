//! A small stateful fake of the Kubernetes API server, as a `tower::Service` behind a real
//! `kube::Client`. It stores objects by path, implements server-side apply closely enough for
//! reconcile — field ownership per manager with conflicts ([`super::managed_fields`]), content
//! changes bump `resourceVersion`, spec changes bump `generation`, the status subresource is
//! kept apart — records every request, and can be told to fail requests.
//!
//! Where it differed from the real API server (`tests/tests/control_plane/` runs the real
//! one) it was fixed: an apply replaced the whole object (fields other managers set were
//! dropped) and never conflicted; a status apply replaced the whole status and created a
//! missing object instead of answering 404; objects had no `managedFields`.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

use super::managed_fields::{Conflict, Owners, Scope};

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// HTTP method.
    pub method: Method,
    /// Path without the query.
    pub path: String,
    /// Query string (`fieldManager=...&force=true`).
    pub query: String,
    /// Content type of the body.
    pub content_type: String,
    /// Body as JSON, when there is one.
    pub body: Option<Value>,
}

impl Recorded {
    /// Whether this is a server-side apply by `manager`.
    pub fn is_apply_by(&self, manager: &str) -> bool {
        self.method == Method::PATCH
            && self.content_type.starts_with("application/apply-patch")
            && self.query.contains(&format!("fieldManager={manager}"))
    }

    /// Whether it forces conflicts.
    pub fn is_forced(&self) -> bool {
        self.query.contains("force=true")
    }

    /// Whether this request writes an event.
    pub fn is_event(&self) -> bool {
        self.path.contains("/events")
    }
}

struct Injected {
    method: Method,
    path_contains: String,
    code: u16,
    remaining: usize,
}

#[derive(Default)]
struct State {
    objects: BTreeMap<String, Value>,
    owners: BTreeMap<String, Owners>,
    requests: Vec<Recorded>,
    injected: Vec<Injected>,
    next_version: u64,
}

/// Handle on the fake's state, shared with the service the client uses.
#[derive(Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code})
}

/// Object content without the fields the server owns, to tell real changes from repeats.
fn content(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        for key in [
            "resourceVersion",
            "generation",
            "uid",
            "creationTimestamp",
            "managedFields",
        ] {
            meta.remove(key);
        }
    }
    if let Some(obj) = v.as_object_mut() {
        obj.remove("status");
    }
    v
}

impl FakeApi {
    /// A `kube::Client` talking to this fake.
    pub fn client(&self) -> kube::Client {
        let this = self.clone();
        let service = tower::service_fn(move |req: Request<kube::client::Body>| {
            let this = this.clone();
            async move { Ok::<_, Infallible>(this.handle(req).await) }
        });
        kube::Client::new(service, "default")
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Forgets the recorded requests (not the objects).
    pub fn clear_requests(&self) {
        self.state.lock().unwrap().requests.clear();
    }

    /// The stored object at `path`.
    pub fn object(&self, path: &str) -> Option<Value> {
        self.state.lock().unwrap().objects.get(path).cloned()
    }

    /// Stores `object` at `path` as if it had been created.
    pub fn insert(&self, path: &str, mut object: Value) {
        let mut s = self.state.lock().unwrap();
        s.next_version += 1;
        object["metadata"]["resourceVersion"] = json!(s.next_version.to_string());
        if object["metadata"]["generation"].is_null() {
            object["metadata"]["generation"] = json!(1);
        }
        s.objects.insert(path.to_owned(), object);
    }

    /// Changes the object at `path` as `manager` would with `kubectl edit` or `patch` (an
    /// update: it takes the fields it writes, without conflicts). `changes` is a merge patch.
    pub fn edit(&self, path: &str, manager: &str, changes: Value) {
        let mut s = self.state.lock().unwrap();
        let stored = s.objects.get(path).cloned().expect("the object exists");
        let owners = s.owners.entry(path.to_owned()).or_default();
        let mut edited = owners.update(&stored, manager, &changes);
        edited["metadata"]["managedFields"] = owners.managed_fields();
        s.next_version += 1;
        edited["metadata"]["resourceVersion"] = json!(s.next_version.to_string());
        s.objects.insert(path.to_owned(), edited);
    }

    /// Applies `patch` to the object at `path` as another `manager` (a GitOps tool, say), with
    /// `force` as that tool would.
    pub fn apply_as(&self, path: &str, manager: &str, patch: Value) {
        let mut s = self.state.lock().unwrap();
        let stored = s.objects.get(path).cloned().unwrap_or(Value::Null);
        let owners = s.owners.entry(path.to_owned()).or_default();
        let mut applied = owners
            .apply(&stored, manager, &patch, Scope::Main, true)
            .expect("a forced apply does not conflict");
        applied["metadata"]["managedFields"] = owners.managed_fields();
        s.next_version += 1;
        applied["metadata"]["resourceVersion"] = json!(s.next_version.to_string());
        s.objects.insert(path.to_owned(), applied);
    }

    /// Replaces the status of the object at `path`, as its controller would.
    pub fn set_status(&self, path: &str, status: Value) {
        let mut s = self.state.lock().unwrap();
        if let Some(obj) = s.objects.get_mut(path) {
            obj["status"] = status;
        }
    }

    /// Makes the next `times` requests with `method` whose path contains `path_contains` fail
    /// with `code`.
    pub fn fail(&self, method: Method, path_contains: &str, code: u16, times: usize) {
        self.state.lock().unwrap().injected.push(Injected {
            method,
            path_contains: path_contains.to_owned(),
            code,
            remaining: times,
        });
    }

    async fn handle(&self, req: Request<kube::client::Body>) -> Response<Full<Bytes>> {
        let (parts, body) = req.into_parts();
        let bytes = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let body: Option<Value> = if bytes.is_empty() {
            None
        } else {
            serde_json::from_slice(&bytes).ok()
        };
        let recorded = Recorded {
            method: parts.method.clone(),
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().unwrap_or_default().to_owned(),
            content_type: parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned(),
            body: body.clone(),
        };
        let mut s = self.state.lock().unwrap();
        s.requests.push(recorded.clone());

        if let Some(inj) = s.injected.iter_mut().find(|i| {
            i.remaining > 0
                && i.method == recorded.method
                && recorded.path.contains(&i.path_contains)
        }) {
            inj.remaining -= 1;
            let code = inj.code;
            let reason = if code == 409 {
                "Conflict"
            } else {
                "InternalError"
            };
            return respond(code, status_body(code, reason, "injected failure"));
        }

        let path = recorded.path.clone();
        match (recorded.method.clone(), body) {
            (Method::GET, _) => match s.objects.get(&path) {
                Some(obj) => respond(200, obj.clone()),
                // A collection: every object one path segment below (label selectors are not
                // evaluated; the tests keep one MessageQueue's objects per namespace).
                None if is_collection(&path) => {
                    let prefix = format!("{path}/");
                    let items: Vec<Value> = s
                        .objects
                        .iter()
                        .filter(|(p, _)| {
                            p.strip_prefix(&prefix)
                                .is_some_and(|rest| !rest.contains('/'))
                        })
                        .map(|(_, o)| o.clone())
                        .collect();
                    let version = s.next_version.to_string();
                    respond(
                        200,
                        json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": version}, "items": items}),
                    )
                }
                None => respond(
                    404,
                    status_body(404, "NotFound", &format!("{path} not found")),
                ),
            },
            (Method::DELETE, _) => match s.objects.remove(&path) {
                Some(obj) => respond(200, obj),
                None => respond(
                    404,
                    status_body(404, "NotFound", &format!("{path} not found")),
                ),
            },
            (Method::POST, Some(obj)) => {
                let name = obj["metadata"]["name"]
                    .as_str()
                    .unwrap_or("unnamed")
                    .to_owned();
                s.objects.insert(format!("{path}/{name}"), obj.clone());
                respond(201, obj)
            }
            (Method::PATCH, Some(patch)) if path.ends_with("/status") => {
                let object_path = path.trim_end_matches("/status").to_owned();
                let Some(stored) = s.objects.get(&object_path).cloned() else {
                    return respond(
                        404,
                        status_body(404, "NotFound", &format!("{object_path} not found")),
                    );
                };
                let (manager, force) = apply_params(&recorded.query);
                let owners = s.owners.entry(object_path.clone()).or_default();
                let mut applied =
                    match owners.apply(&stored, &manager, &patch, Scope::Status, force) {
                        Ok(applied) => applied,
                        Err(conflicts) => return respond(409, conflict_body(&conflicts)),
                    };
                applied["metadata"]["managedFields"] = owners.managed_fields();
                s.next_version += 1;
                applied["metadata"]["resourceVersion"] = json!(s.next_version.to_string());
                s.objects.insert(object_path, applied.clone());
                respond(200, applied)
            }
            (Method::PATCH, Some(patch)) if path.contains("/events") => {
                let stored = s.objects.entry(path).or_insert_with(|| patch.clone());
                respond(200, stored.clone())
            }
            (Method::PATCH, Some(patch)) => {
                let existing = s.objects.get(&path).cloned();
                let (manager, force) = apply_params(&recorded.query);
                let owners = s.owners.entry(path.clone()).or_default();
                let owned_before = owners.managed_fields();
                let stored = existing.clone().unwrap_or(Value::Null);
                let mut new = match owners.apply(&stored, &manager, &patch, Scope::Main, force) {
                    Ok(applied) => applied,
                    Err(conflicts) => return respond(409, conflict_body(&conflicts)),
                };
                let owned_after = owners.managed_fields();
                new["metadata"]["managedFields"] = owned_after.clone();
                let result = match existing {
                    Some(old) if content(&old) == content(&new) && owned_before == owned_after => {
                        old
                    }
                    Some(old) => {
                        s.next_version += 1;
                        new["metadata"]["resourceVersion"] = json!(s.next_version.to_string());
                        let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
                        let spec_changed = old.get("spec") != new.get("spec");
                        new["metadata"]["generation"] = json!(if spec_changed {
                            generation + 1
                        } else {
                            generation
                        });
                        new
                    }
                    None => {
                        s.next_version += 1;
                        new["metadata"]["uid"] = json!(format!("uid-{}", s.next_version));
                        new["metadata"]["resourceVersion"] = json!(s.next_version.to_string());
                        new["metadata"]["generation"] = json!(1);
                        new
                    }
                };
                s.objects.insert(path, result.clone());
                respond(200, result)
            }
            _ => respond(
                405,
                status_body(405, "MethodNotAllowed", "the fake does not serve this"),
            ),
        }
    }
}

/// The `fieldManager` and `force` of an apply's query.
fn apply_params(query: &str) -> (String, bool) {
    let manager = query
        .split('&')
        .find_map(|p| p.strip_prefix("fieldManager="))
        .unwrap_or_default()
        .to_owned();
    (manager, query.split('&').any(|p| p == "force=true"))
}

/// The 409 the API server answers a conflicting apply with: one cause per field.
fn conflict_body(conflicts: &[Conflict]) -> Value {
    let causes: Vec<Value> = conflicts
        .iter()
        .map(|c| {
            json!({"reason": "FieldManagerConflict", "field": c.field,
                   "message": format!("conflict with \"{}\" using v1", c.manager)})
        })
        .collect();
    let mut body = status_body(
        409,
        "Conflict",
        &format!("Apply failed with {} conflicts", conflicts.len()),
    );
    body["details"] = json!({"causes": causes});
    body
}

/// Whether `path` names a collection (`.../namespaces/<ns>/<resource>`) rather than an object.
fn is_collection(path: &str) -> bool {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let after_namespace = parts
        .iter()
        .position(|p| *p == "namespaces")
        .map(|i| parts.len() - i);
    after_namespace == Some(3)
}

fn respond(code: u16, body: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(&body).unwrap())))
        .unwrap()
}
