/* fuzz_npy.c: libFuzzer target for the .npy reader behind sp_generator_load_drafter (npy.c). The input's first two
 * bytes choose the expected shape (rows 1..64, cols 1..8); the rest is the file, read from a memfd through the real
 * path code (stat, open, read). A file it accepts must be exactly the expected size and its values the file's last
 * rows x cols x 4 bytes.
 * Seeds: np.save files of matching and mismatching shapes, dtypes and orders (make_data.py). */
#include "fuzz.h"

#include <sys/mman.h>
#include <unistd.h>

#include "draft.h"

static int g_fd = -1;
static char g_path[64];

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 2) return 0;
    const int32_t rows = 1 + data[0] % 64, cols = 1 + data[1] % 8;
    data += 2;
    size -= 2;
    if (g_fd < 0) {
        g_fd = memfd_create("sparrow-fuzz-npy", MFD_CLOEXEC);
        FZ_CHECK(g_fd >= 0);
        snprintf(g_path, sizeof g_path, "/proc/self/fd/%d", g_fd);
    }
    if (ftruncate(g_fd, 0) != 0) return 0;
    for (size_t off = 0; off < size;) {
        ssize_t w = pwrite(g_fd, data + off, size - off, (off_t)off);
        if (w <= 0) return 0;
        off += (size_t)w;
    }
    int32_t out[64 * 8];
    const size_t n = (size_t)rows * (size_t)cols;
    if (sp_npy_load_i32(g_path, out, rows, cols) == SP_OK) {
        FZ_CHECK(size >= n * sizeof *out);
        FZ_CHECK(memcmp(out, data + size - n * sizeof *out, n * sizeof *out) == 0);
    } else {
        FZ_CHECK(sp_last_error()[0] != '\0');
    }
    return 0;
}
