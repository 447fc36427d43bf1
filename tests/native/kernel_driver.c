/* Runs an instruction set's kernels on arrays read from files, for tests that cannot load the
 * kernels into Python (NEON under qemu-user: tests/test_neon.py). Built together with one kernel
 * source:  cc -DKERNELS='"neon.c"' -I lmtool/kernels kernel_driver.c ...
 * Reads commands from stdin, one a line, and writes each output array to its file:
 *   linear KIND M K OUT X NPARTS (ROWS W BIAS|-)...
 *   gelu BF16 ROWS N OUT GATE UP|-
 *   attend BF16 B H KV S HD SCALE OUT Q K V BIAS|- MASK|-
 * Arrays are raw little-endian, contiguous; masks one byte per key. */
#include <stdio.h>
#include KERNELS

static void* slurp(const char* path) {
    if (path[0] == '-' && !path[1]) return NULL;
    FILE* f = fopen(path, "rb");
    if (!f) { perror(path); exit(2); }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    void* data = malloc(n ? n : 1);
    if (fread(data, 1, n, f) != (size_t)n) { perror(path); exit(2); }
    fclose(f);
    return data;
}

static void spill(const char* path, const void* data, size_t bytes) {
    FILE* f = fopen(path, "wb");
    if (!f || fwrite(data, 1, bytes, f) != bytes) { perror(path); exit(2); }
    fclose(f);
}

int main(void) {
    char op[16], out[512];
    while (scanf("%15s", op) == 1) {
        if (!strcmp(op, "linear")) {
            int kind; long long M, K, nparts; char xpath[512];
            if (scanf("%d %lld %lld %511s %511s %lld", &kind, &M, &K, out, xpath, &nparts) != 6) return 2;
            part_t parts[16];
            long long total = 0;
            for (long long p = 0; p < nparts; p++) {
                long long rows; char w[512], b[512];
                if (scanf("%lld %511s %511s", &rows, w, b) != 3) return 2;
                parts[p] = (part_t){slurp(w), slurp(b), rows};
                total += rows;
            }
            const size_t size = kind == BF16_BF16 ? 2 : 4;
            void* y = malloc(M * total * size);
            lm_linear(kind, slurp(xpath), M, K, parts, nparts, y, total);
            spill(out, y, M * total * size);
        } else if (!strcmp(op, "gelu")) {
            int bf16; long long rows, n; char g[512], u[512];
            if (scanf("%d %lld %lld %511s %511s %511s", &bf16, &rows, &n, out, g, u) != 6) return 2;
            const size_t bytes = rows * n * (bf16 ? 2 : 4);
            void* y = malloc(bytes);
            lm_gelu_tanh_mul(bf16, slurp(g), n, slurp(u), n, y, n, rows, n);
            spill(out, y, bytes);
        } else if (!strcmp(op, "attend")) {
            int bf16; long long B, H, KV, S, hd; float scale; char q[512], k[512], v[512], b[512], m[512];
            if (scanf("%d %lld %lld %lld %lld %lld %f %511s %511s %511s %511s %511s %511s", &bf16, &B, &H, &KV, &S,
                      &hd, &scale, out, q, k, v, b, m) != 13) return 2;
            const size_t bytes = B * H * hd * (bf16 ? 2 : 4);
            void* y = malloc(bytes);
            float* scores = malloc(B * H * S * sizeof(float));
            lm_attend_one(bf16, slurp(q), H * hd, hd, slurp(k), slurp(v), KV * S * hd, S * hd, B, H, KV, S, hd, scale,
                          slurp(b), S, slurp(m), S, y, scores);
            spill(out, y, bytes);
        } else {
            fprintf(stderr, "unknown command %s\n", op);
            return 2;
        }
    }
    return 0;
}
