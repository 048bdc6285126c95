//! The flags of `sluice-operator`, from its clap `Args` (`sluice_operator::args`): each long
//! flag with its `env` variable and default value.

use clap::CommandFactory as _;
use sluice_operator::args::Args;

/// One flag of the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flag {
    /// `--name` as typed on the command line.
    pub long: String,
    /// Environment variable that also sets it.
    pub env: Option<String>,
    /// The default value, when there is one.
    pub default: Option<String>,
}

/// Every long flag of `sluice-operator` (clap's own `--help`/`--version` excluded).
pub fn operator_flags() -> Vec<Flag> {
    let command = Args::command();
    let flags: Vec<Flag> = command
        .get_arguments()
        .filter_map(|arg| {
            Some(Flag {
                long: format!("--{}", arg.get_long()?),
                env: arg.get_env().map(|e| e.to_string_lossy().into_owned()),
                default: arg
                    .get_default_values()
                    .first()
                    .map(|d| d.to_string_lossy().into_owned()),
            })
        })
        .filter(|f| f.long != "--help" && f.long != "--version")
        .collect();
    assert!(!flags.is_empty(), "sluice-operator defines no flags");
    flags
}
