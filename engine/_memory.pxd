# Zeroed memory for the engine's large random-access tables (the hash tables of
# engine/_hashing.pyx, the accumulator state rows of engine/settle.py): one home.

cdef void* zeroed_table(size_t nbytes) noexcept nogil
cdef void free_table(void* p, size_t nbytes) noexcept nogil
