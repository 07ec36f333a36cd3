// Argument validation shared by the host functions and the CUDA entry point. Every failure is a
// std::invalid_argument, which pybind11 raises in Python as ValueError.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "bitfuse/format.h"

namespace bitfuse {
namespace host {

[[noreturn]] inline void fail(const std::string& msg) { throw std::invalid_argument(msg); }

inline void check_bits(int bits) {
  if (bits != 2 && bits != 3 && bits != 4)
    fail("bitfuse: dense codes are 2, 3 or 4 bits, got bits=" + std::to_string(bits));
}

inline void check_k_pad(int k_pad) {
  if (k_pad <= 0 || k_pad % kWordBits)
    fail("bitfuse: k_pad must be a positive multiple of 32, got " + std::to_string(k_pad));
}

inline std::string list_str(const std::vector<int>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

// The layer geometry of FORMAT.md §2 and §4: group size, k_pad = K rounded up to whole groups,
// classes that cover exactly the n packed rows. Returns the class table the kernels take.
inline ClassTable make_class_table(const std::vector<int>& class_bits,
                                   const std::vector<int>& class_rows, int n, int k, int k_pad,
                                   int group_size) {
  if (n < 0) fail("bitfuse: n must be >= 0, got " + std::to_string(n));
  if (k <= 0) fail("bitfuse: k must be positive, got " + std::to_string(k));
  if (group_size <= 0 || group_size % kWordBits)
    fail("bitfuse: group_size must be a positive multiple of 32, got " + std::to_string(group_size));
  const int64_t want = (int64_t(k) + group_size - 1) / group_size * group_size;
  if (k_pad != want)
    fail("bitfuse: k_pad must be k rounded up to a multiple of group_size (" +
         std::to_string(want) + " for k=" + std::to_string(k) + ", group_size=" +
         std::to_string(group_size) + "), got " + std::to_string(k_pad));
  if (class_bits.size() != class_rows.size())
    fail("bitfuse: class_bits " + list_str(class_bits) + " and class_rows " +
         list_str(class_rows) + " differ in length");
  if (class_bits.empty() || class_bits.size() > size_t(kMaxClasses))
    fail("bitfuse: a layer has 1 to " + std::to_string(kMaxClasses) + " bit classes, got " +
         std::to_string(class_bits.size()));
  ClassTable t{};
  t.count = int(class_bits.size());
  int64_t total = 0;
  for (int c = 0; c < t.count; ++c) {
    check_bits(class_bits[c]);
    if (class_rows[c] < 0) fail("bitfuse: class_rows must be >= 0, got " + list_str(class_rows));
    t.bits[c] = class_bits[c];
    t.rows[c] = class_rows[c];
    total += class_rows[c];
  }
  if (total != n)
    fail("bitfuse: class_rows " + list_str(class_rows) + " sum to " + std::to_string(total) +
         ", but n=" + std::to_string(n));
  return t;
}

}  // namespace host
}  // namespace bitfuse

#include "bitfuse/gemv.h"

namespace bitfuse {
namespace host {

// The class layout the GEMV reads (gemv::Args): first row, first word and 128-bit-load flag of
// each class. Every class boundary except the end must be a multiple of the GEMV's 16-row block
// (FORMAT.md §4 makes them multiples of 16 or 64), so that a block's rows share one bit width.
inline void fill_gemv_classes(gemv::Args& a, const ClassTable& t, int k_pad,
                              std::uint64_t qweight_addr, const char* who) {
  a.classes = t;
  int first = 0;
  for (int c = 0; c < t.count; ++c) {
    if (c > 0 && t.rows[c] > 0 && first % gemv::kRowsPerBlock)
      fail(std::string(who) + ": bit-class boundaries must be multiples of " +
           std::to_string(gemv::kRowsPerBlock) + " rows (FORMAT.md §4), got class_rows " +
           list_str(std::vector<int>(t.rows, t.rows + t.count)));
    a.class_first[c] = first;
    a.class_word[c] = class_word_offset(t.bits, t.rows, c, k_pad);
    a.class_vec[c] = gemv::class_vec_ok(qweight_addr, a.class_word[c], t.bits[c], k_pad);
    first += t.rows[c];
  }
}

}  // namespace host
}  // namespace bitfuse
