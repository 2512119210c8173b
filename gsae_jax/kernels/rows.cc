// Row kernels for the sparse train step on CPU (XLA FFI; see gsae_jax/kernels/rows.py).
//
// Each token b carries K feature indices idx[b, k] into a [M, n] row-major table (W_dec, or the
// transposed encoder weight) and a per-slot value. XLA:CPU runs these as a gather of [B, K, n]
// rows followed by a product (or a product followed by a scatter-add), moving K x n values per
// token through memory twice; here each row is read (or accumulated) once, in cache.
//
//   bag:     out[b, :] = sum_k v[b, k] * table[idx[b, k], :]                 [B, n]
//   dot:     out[b, k] = <g[b, :], table[idx[b, k], :]>                       [B, K]
//   scatter: out[m, :] = sum_{(b, k): idx[b, k] = m} v[b, k] * g[b, :]       [M, n]
//   positive slots: each token's features with score > 0, in index order, and their count
//
// Slots whose value is exactly 0 are skipped by bag and scatter (they add nothing). Work is
// split over XLA's intra-op thread pool: bag and dot by tokens, scatter by ranges of output rows
// (each thread visits the slots in (b, k) order), so every sum has a fixed order whatever the
// thread count, and results are deterministic.

#include <algorithm>
#include <climits>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Runs body(part) for part in [0, parts) on the pool's threads and the calling thread; returns
// when all parts are done. Tasks that start after the work is taken exit at once (the shared
// state outlives this call).
void ParallelFor(ffi::ThreadPool& pool, int64_t parts, const std::function<void(int64_t)>& body) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
    const std::function<void(int64_t)>* body;
    int64_t parts;
  };
  auto state = std::make_shared<State>();
  state->body = &body;
  state->parts = parts;
  auto work = [](const std::shared_ptr<State>& s) {
    for (int64_t p; (p = s->next.fetch_add(1)) < s->parts;) {
      (*s->body)(p);
      if (s->done.fetch_add(1) + 1 == s->parts) {
        std::lock_guard<std::mutex> lock(s->mu);
        s->cv.notify_all();
      }
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), parts) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([state, work] { work(state); });
  work(state);
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == parts; });
}

int64_t Parts(ffi::ThreadPool& pool, int64_t items) {
  return std::max<int64_t>(1, std::min<int64_t>(items, 8 * std::max<int64_t>(1, pool.num_threads())));
}

template <typename T>
void Bag(ffi::ThreadPool& pool, const T* v, const int32_t* idx, const T* table, T* out,
         int64_t tokens, int64_t slots, int64_t n) {
  int64_t parts = Parts(pool, tokens);
  ParallelFor(pool, parts, [&](int64_t p) {
    for (int64_t b = tokens * p / parts; b < tokens * (p + 1) / parts; ++b) {
      T* o = out + b * n;
      std::fill(o, o + n, T(0));
      for (int64_t k = 0; k < slots; ++k) {
        T a = v[b * slots + k];
        if (a == T(0)) continue;
        const T* row = table + int64_t(idx[b * slots + k]) * n;
        for (int64_t j = 0; j < n; ++j) o[j] += a * row[j];
      }
    }
  });
}

constexpr int64_t kLanes = 16;

template <typename T>
void Dot(ffi::ThreadPool& pool, const T* g, const int32_t* idx, const T* table, T* out,
         int64_t tokens, int64_t slots, int64_t n) {
  int64_t parts = Parts(pool, tokens);
  ParallelFor(pool, parts, [&](int64_t p) {
    for (int64_t b = tokens * p / parts; b < tokens * (p + 1) / parts; ++b) {
      const T* gb = g + b * n;
      for (int64_t k = 0; k < slots; ++k) {
        const T* row = table + int64_t(idx[b * slots + k]) * n;
        // kLanes partial sums in a fixed order (vectorised without reassociating the loop)
        T lanes[kLanes] = {};
        int64_t j = 0;
        for (; j + kLanes <= n; j += kLanes)
          for (int64_t l = 0; l < kLanes; ++l) lanes[l] += gb[j + l] * row[j + l];
        T acc = 0;
        for (; j < n; ++j) acc += gb[j] * row[j];
        for (int64_t l = 0; l < kLanes; ++l) acc += lanes[l];
        out[b * slots + k] = acc;
      }
    }
  });
}

template <typename T>
void Scatter(ffi::ThreadPool& pool, const T* v, const int32_t* idx, const T* g, T* out,
             int64_t tokens, int64_t slots, int64_t n, int64_t rows) {
  int64_t parts = Parts(pool, rows);
  ParallelFor(pool, parts, [&](int64_t p) {
    int64_t lo = rows * p / parts, hi = rows * (p + 1) / parts;
    std::fill(out + lo * n, out + hi * n, T(0));
    for (int64_t s = 0; s < tokens * slots; ++s) {
      int64_t m = idx[s];
      T a = v[s];
      if (m < lo || m >= hi || a == T(0)) continue;
      T* o = out + m * n;
      const T* gb = g + (s / slots) * n;
      for (int64_t j = 0; j < n; ++j) o[j] += a * gb[j];
    }
  });
}

// idx[b, :] = the features with score > 0 in increasing order, then (padding) the row's first
// feature with score <= 0; count[b] = how many features have score > 0 (may exceed the slots).
template <typename T>
void PositiveSlots(ffi::ThreadPool& pool, const T* score, int32_t* idx, int32_t* count,
                   int64_t tokens, int64_t features, int64_t slots) {
  int64_t parts = Parts(pool, tokens);
  ParallelFor(pool, parts, [&](int64_t p) {
    for (int64_t b = tokens * p / parts; b < tokens * (p + 1) / parts; ++b) {
      const T* s = score + b * features;
      int32_t* out = idx + b * slots;
      int64_t c = 0, pad = -1;
      for (int64_t m = 0; m < features; ++m) {
        if (s[m] > T(0)) {
          if (c < slots) out[c] = int32_t(m);
          ++c;
        } else if (pad < 0) {
          pad = m;
        }
      }
      for (int64_t k = c; k < slots; ++k) out[k] = int32_t(std::max<int64_t>(pad, 0));
      count[b] = int32_t(std::min<int64_t>(c, INT32_MAX));
    }
  });
}

ffi::Error CheckIndices(ffi::Buffer<ffi::S32> idx, int64_t rows) {
  const int32_t* p = idx.typed_data();
  for (size_t i = 0; i < idx.element_count(); ++i)
    if (p[i] < 0 || p[i] >= rows)
      return ffi::Error::InvalidArgument("row index out of range");
  return ffi::Error::Success();
}

// Calls run(T{}) for T the C type of `types` (float32 or float64; all of them the same).
template <typename Run>
ffi::Error ForFloatType(std::initializer_list<ffi::DataType> types, Run&& run) {
  ffi::DataType type = *types.begin();
  for (ffi::DataType other : types)
    if (other != type) return ffi::Error::InvalidArgument("operands of different dtypes");
  if (type == ffi::F32)
    run(float{});
  else if (type == ffi::F64)
    run(double{});
  else
    return ffi::Error::InvalidArgument("dtype: float32 or float64");
  return ffi::Error::Success();
}

// Shapes: v, idx [B, K]; table [M, n]; g [B, n].
ffi::Error BagImpl(ffi::ThreadPool pool, ffi::AnyBuffer v, ffi::Buffer<ffi::S32> idx,
                   ffi::AnyBuffer table, ffi::Result<ffi::AnyBuffer> out) {
  auto vd = v.dimensions(), td = table.dimensions();
  if (vd.size() != 2 || td.size() != 2) return ffi::Error::InvalidArgument("rank");
  if (auto e = CheckIndices(idx, td[0]); e.failure()) return e;
  return ForFloatType({v.element_type(), table.element_type(), out->element_type()}, [&](auto t) {
    using T = decltype(t);
    Bag(pool, v.typed_data<T>(), idx.typed_data(), table.typed_data<T>(), out->typed_data<T>(),
        vd[0], vd[1], td[1]);
  });
}

ffi::Error DotImpl(ffi::ThreadPool pool, ffi::AnyBuffer g, ffi::Buffer<ffi::S32> idx,
                   ffi::AnyBuffer table, ffi::Result<ffi::AnyBuffer> out) {
  auto id = idx.dimensions(), td = table.dimensions();
  if (id.size() != 2 || td.size() != 2) return ffi::Error::InvalidArgument("rank");
  if (auto e = CheckIndices(idx, td[0]); e.failure()) return e;
  return ForFloatType({g.element_type(), table.element_type(), out->element_type()}, [&](auto t) {
    using T = decltype(t);
    Dot(pool, g.typed_data<T>(), idx.typed_data(), table.typed_data<T>(), out->typed_data<T>(),
        id[0], id[1], td[1]);
  });
}

ffi::Error ScatterImpl(ffi::ThreadPool pool, ffi::AnyBuffer v, ffi::Buffer<ffi::S32> idx,
                       ffi::AnyBuffer g, ffi::Result<ffi::AnyBuffer> out) {
  auto vd = v.dimensions(), od = out->dimensions();
  if (vd.size() != 2 || od.size() != 2) return ffi::Error::InvalidArgument("rank");
  if (auto e = CheckIndices(idx, od[0]); e.failure()) return e;
  return ForFloatType({v.element_type(), g.element_type(), out->element_type()}, [&](auto t) {
    using T = decltype(t);
    Scatter(pool, v.typed_data<T>(), idx.typed_data(), g.typed_data<T>(), out->typed_data<T>(),
            vd[0], vd[1], od[1], od[0]);
  });
}

ffi::Error PositiveSlotsImpl(ffi::ThreadPool pool, ffi::AnyBuffer score,
                             ffi::Result<ffi::Buffer<ffi::S32>> idx,
                             ffi::Result<ffi::Buffer<ffi::S32>> count) {
  auto sd = score.dimensions(), id = idx->dimensions();
  if (sd.size() != 2 || id.size() != 2 || id[0] != sd[0])
    return ffi::Error::InvalidArgument("shapes: score [B, M], idx [B, S]");
  return ForFloatType({score.element_type()}, [&](auto t) {
    using T = decltype(t);
    PositiveSlots(pool, score.typed_data<T>(), idx->typed_data(), count->typed_data(), sd[0],
                  sd[1], id[1]);
  });
}

}  // namespace

#define GSAE_BIND ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::AnyBuffer>() \
    .Arg<ffi::Buffer<ffi::S32>>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(GsaeRowsBag, BagImpl, GSAE_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(GsaeRowsDot, DotImpl, GSAE_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(GsaeRowsScatter, ScatterImpl, GSAE_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(GsaePositiveSlots, PositiveSlotsImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::S32>>().Ret<ffi::Buffer<ffi::S32>>());
