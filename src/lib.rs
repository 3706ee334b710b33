//! shakedown finds out how LLM serving stacks hold up when things break.
pub mod playbook;
