//! shakedown finds out how LLM serving stacks hold up when things break.
pub mod cluster;
pub mod engine;
pub mod events;
pub mod faults;
pub mod jsonl;
pub mod load;
pub mod measure;
pub mod playbook;
pub mod router;
pub mod tokens;
