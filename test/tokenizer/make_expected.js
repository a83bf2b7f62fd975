// make_expected.js: writes test/tokenizer/corpus.out, the ids that a Hugging Face-compatible
// tokenizer (@lenml/tokenizers, a port of transformers.js) gives for each text of corpus.inp, and
// corpus.nfc, each text in NFC (JavaScript's String.normalize), what decoding the ids must give;
// and random.out for random.inp: 300 random strings of letters, marks, jamo, Thai, emoji, spaces,
// contractions and special tokens (made once by a throwaway generator; only the texts are kept).
// Run by hand from the repository root, never by make:
//     node test/tokenizer/make_expected.js PATH/TO/node_modules
// It first checks that the reference reproduces Hugging Face's ids for the 46 texts of
// qwen2.inp / qwen2.out, and stops if it does not.
// File format (as llama.cpp's tokenizer tests): texts separated by "\n__ggml_vocab_test__\n";
// one line of ids per text, each id preceded by a space.
const fs = require('fs');
const path = require('path');
const { TokenizerLoader } = require(path.resolve(process.argv[2] || 'node_modules', '@lenml/tokenizers'));

const dir = 'test/tokenizer';
const tok = TokenizerLoader.fromPreTrained({
    tokenizerJSON: JSON.parse(fs.readFileSync('data/tokenizer.json', 'utf8')),
    tokenizerConfig: JSON.parse(fs.readFileSync('data/tokenizer_config.json', 'utf8')),
});
const encode = (text) => tok.encode(text, { add_special_tokens: false });
const texts = (file) => fs.readFileSync(path.join(dir, file), 'utf8').split('\n__ggml_vocab_test__\n').slice(0, -1);
const line = (ids) => ids.map((id) => ' ' + id).join('');

const want = fs.readFileSync(path.join(dir, 'qwen2.out'), 'utf8').split('\n');
texts('qwen2.inp').forEach((text, i) => {
    if (line(encode(text)) !== want[i]) {
        console.error(`the reference disagrees with Hugging Face on qwen2.inp text ${i}: not trusted`);
        process.exit(1);
    }
});
for (const name of ['corpus', 'random']) {
    const out = texts(name + '.inp').map((text) => line(encode(text)) + '\n').join('');
    fs.writeFileSync(path.join(dir, name + '.out'), out);
}
const nfc = texts('corpus.inp').map((text) => text.normalize('NFC') + '\n__ggml_vocab_test__\n').join('');
fs.writeFileSync(path.join(dir, 'corpus.nfc'), nfc);
console.log(`qwen2.inp: all ${want.length - 1} texts agree with Hugging Face; wrote corpus.out, corpus.nfc and random.out`);
