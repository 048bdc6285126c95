//! Prints the MessageQueue CRD as YAML: `cargo run -p sluice-operator --bin crdgen > crds/messagequeue.yaml`.

use kube::CustomResourceExt;
use sluice_operator::crd::MessageQueue;

fn main() {
    match sluice_operator::crd::crd_yaml() {
        Ok(yaml) => print!("{yaml}"),
        Err(e) => {
            eprintln!(
                "crdgen: serializing the {} CRD failed: {e}",
                MessageQueue::crd_name()
            );
            std::process::exit(1);
        }
    }
}
