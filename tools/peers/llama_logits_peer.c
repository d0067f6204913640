// llama.cpp's logits for a prompt given as token ids: loads a GGUF model with libllama (CPU),
// evaluates the prompt in one batch and writes the logits of every position as raw f32,
// [n_prompt][n_vocab] row-major -- the layout of ggml-fa-run --logits-out, so the two engines
// can be compared on the same file. Built and run by llama_cpu_peer.sh; not part of the build.
//
//   llama_logits_peer MODEL.gguf ID,ID,... OUT.f32 [threads]
#include <llama.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void quiet_log(enum ggml_log_level level, const char* text, void* user) {
    (void)user;
    if (level >= GGML_LOG_LEVEL_WARN) fputs(text, stderr);
}

static int parse_ids(const char* s, llama_token** out) {
    int n = 1;
    for (const char* p = s; *p; ++p) n += *p == ',';
    *out = malloc(sizeof(llama_token) * (size_t)n);
    int count = 0;
    while (*s) {
        char* end = NULL;
        const long v = strtol(s, &end, 10);
        if (end == s || v < 0 || (*end != ',' && *end != '\0')) {
            fprintf(stderr, "llama_logits_peer: bad token id list near \"%.20s\"\n", s);
            return -1;
        }
        (*out)[count++] = (llama_token)v;
        s = *end == ',' ? end + 1 : end;
    }
    return count;
}

int main(int argc, char** argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: llama_logits_peer MODEL.gguf ID,ID,... OUT.f32 [threads]\n");
        return 2;
    }
    llama_token* tokens = NULL;
    const int n_tokens = parse_ids(argv[2], &tokens);
    if (n_tokens <= 0) return 2;
    const int threads = argc > 4 ? atoi(argv[4]) : 2;

    llama_log_set(quiet_log, NULL);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    struct llama_model* model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        fprintf(stderr, "llama_logits_peer: llama.cpp could not load %s\n", argv[1]);
        return 1;
    }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));

    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t)n_tokens + 16;
    cp.n_batch = cp.n_ubatch = (uint32_t)n_tokens;
    cp.n_threads = cp.n_threads_batch = threads;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_ENABLED;
    struct llama_context* ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "llama_logits_peer: could not create a context\n");
        return 1;
    }

    // One batch with every position's logits requested.
    struct llama_batch batch = llama_batch_init(n_tokens, 0, 1);
    for (int i = 0; i < n_tokens; ++i) {
        batch.token[i] = tokens[i];
        batch.pos[i] = i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;
    }
    batch.n_tokens = n_tokens;
    if (llama_decode(ctx, batch) != 0) {
        fprintf(stderr, "llama_logits_peer: llama_decode failed\n");
        return 1;
    }
    FILE* f = fopen(argv[3], "wb");
    if (!f) {
        fprintf(stderr, "llama_logits_peer: cannot open %s\n", argv[3]);
        return 1;
    }
    for (int i = 0; i < n_tokens; ++i) {
        const float* row = llama_get_logits_ith(ctx, i);
        if (!row || fwrite(row, sizeof(float), (size_t)n_vocab, f) != (size_t)n_vocab) {
            fprintf(stderr, "llama_logits_peer: no logits for position %d\n", i);
            return 1;
        }
    }
    fclose(f);
    fprintf(stderr, "llama_logits_peer: %d positions x %d logits -> %s\n", n_tokens, n_vocab, argv[3]);
    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    free(tokens);
    return 0;
}
