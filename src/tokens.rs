//! Approximate tokens without a tokenizer download: four characters a token,
//! the usual rule of thumb for English with Llama-family tokenizers. The load
//! generator writes prompts to this rule and the emulated engine counts by
//! it, so the two agree exactly; a real engine counts its own way.

/// Tokens in `text` by the four-characters rule, at least one.
pub fn approx_tokens(text: &str) -> u32 {
    (text.len().div_ceil(4)).max(1).min(u32::MAX as usize) as u32
}

const WORDS: &[&str] = &[
    "the", "and", "for", "you", "are", "can", "GPU", "not", "but", "any", "all", "one", "our",
    "was", "has", "its", "pod", "new", "use", "way", "map", "set", "log", "run", "key", "job",
    "add", "end", "top", "low",
];

/// A cheap, seeded, well-mixed hash (splitmix64): reproducible text without
/// a shared random generator behind a lock.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The `index`th word of a seeded sequence: three letters, one token.
pub fn word(seed: u64, index: u64) -> &'static str {
    WORDS[(mix(seed ^ index.wrapping_mul(0x2545_F491_4F6C_DD1D)) % WORDS.len() as u64) as usize]
}

/// A prompt of `tokens` tokens by [`approx_tokens`]: three-letter words and spaces.
pub fn synth_prompt(tokens: u32, seed: u64) -> String {
    let mut text = String::with_capacity(tokens as usize * 4);
    for i in 0..tokens as u64 {
        if i > 0 {
            text.push(' ');
        }
        text.push_str(word(seed, i));
    }
    // n words and n-1 spaces are 4n-1 characters: pad to exactly 4n.
    text.push('.');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_prompts_have_the_asked_token_count() {
        for n in [1, 2, 7, 512, 4000] {
            assert_eq!(approx_tokens(&synth_prompt(n, 3)), n);
        }
    }

    #[test]
    fn same_seed_same_text() {
        assert_eq!(synth_prompt(50, 9), synth_prompt(50, 9));
        assert_ne!(synth_prompt(50, 9), synth_prompt(50, 10));
    }
}
