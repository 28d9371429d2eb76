// Software prefetch (the GCC/Clang builtin), which Swift does not expose. A prefetch never
// faults, so an address past the end of a buffer is harmless.
static inline void lora_prefetch_read(const void *address) { __builtin_prefetch(address, 0, 3); }
static inline void lora_prefetch_write(const void *address) { __builtin_prefetch(address, 1, 3); }
