# Cross build for 64-bit ARM Linux with Debian's cross toolchain (apt-get install gcc-aarch64-linux-gnu
# libc6-dev-arm64-cross qemu-user); programs run under qemu-aarch64 with the target's C library:
#   cmake -S native -B build/aarch64 -DCMAKE_TOOLCHAIN_FILE=native/cmake/aarch64-linux-gnu.cmake \
#         -DSPARROW_PYTHON=OFF -DSPARROW_JAVA=OFF -DSPARROW_CHECKS=ON
#   qemu-aarch64 -cpu neoverse-n1 -L /usr/aarch64-linux-gnu build/aarch64/kernels_check
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64;-L;/usr/aarch64-linux-gnu)
