//! Questions from a ShareGPT-format file, the dataset `vllm bench serve
//! --dataset-name sharegpt` reads: a JSON array of conversations, each with
//! `conversations: [{from, value}, …]`. As vllm does, the first turn is the
//! question and conversations with fewer than two turns are skipped.
//!
//! The published ShareGPT file is hundreds of megabytes: the array is read
//! as a stream and only the first [`MAX_PROMPTS`] questions are kept, so
//! memory stays bounded whatever the file.

use std::fmt;
use std::path::Path;

use anyhow::Context;
use serde::Deserialize;
use serde::de::{IgnoredAny, SeqAccess, Visitor};

/// More questions than any run sends distinct ones of, yet a bounded memory.
pub const MAX_PROMPTS: usize = 50_000;

#[derive(Deserialize)]
struct Conversation {
    #[serde(default)]
    conversations: Vec<Turn>,
}

#[derive(Deserialize)]
struct Turn {
    #[serde(default)]
    value: String,
}

struct Questions(Vec<String>);

impl<'de> Deserialize<'de> for Questions {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FirstTurns;
        impl<'de> Visitor<'de> for FirstTurns {
            type Value = Questions;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON array of ShareGPT conversations")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Questions, A::Error> {
                let mut questions = Vec::new();
                while questions.len() < MAX_PROMPTS {
                    match seq.next_element::<Conversation>()? {
                        None => return Ok(Questions(questions)),
                        Some(c) if c.conversations.len() >= 2 => {
                            let mut turns = c.conversations;
                            let question = std::mem::take(&mut turns[0].value);
                            if !question.trim().is_empty() {
                                questions.push(question);
                            }
                        }
                        Some(_) => {}
                    }
                }
                // The rest is read without being built.
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Questions(questions))
            }
        }
        deserializer.deserialize_seq(FirstTurns)
    }
}

/// Reads the questions of a ShareGPT-format file.
pub fn read_sharegpt(path: &Path) -> anyhow::Result<Vec<String>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let reader = std::io::BufReader::with_capacity(1 << 20, file);
    let Questions(questions) = serde_json::from_reader(reader).with_context(|| {
        format!(
            "{} is not a ShareGPT-format file: a JSON array of `{{\"conversations\": [{{\"from\": \"human\", \"value\": …}}, …]}}`",
            path.display()
        )
    })?;
    anyhow::ensure!(
        !questions.is_empty(),
        "{} has no conversation with a question and an answer",
        path.display()
    );
    Ok(questions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_first_turns_of_conversations_with_an_answer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sharegpt.json");
        std::fs::write(
            &path,
            r#"[{"id":"a","conversations":[{"from":"human","value":"Why is the sky blue?"},{"from":"gpt","value":"Rayleigh."}]},
               {"id":"b","conversations":[{"from":"human","value":"alone"}]},
               {"id":"c","conversations":[{"from":"human","value":"Two?"},{"from":"gpt","value":"Yes."},{"from":"human","value":"x"}]}]"#,
        )
        .unwrap();
        assert_eq!(
            read_sharegpt(&path).unwrap(),
            vec!["Why is the sky blue?", "Two?"]
        );
    }

    #[test]
    fn a_file_of_another_shape_says_what_is_expected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("other.json");
        std::fs::write(&path, r#"{"prompts": ["a"]}"#).unwrap();
        let err = format!("{:#}", read_sharegpt(&path).unwrap_err());
        assert!(err.contains("not a ShareGPT-format file"), "{err}");
        std::fs::write(&path, "[]").unwrap();
        assert!(format!("{:#}", read_sharegpt(&path).unwrap_err()).contains("no conversation"));
    }
}
