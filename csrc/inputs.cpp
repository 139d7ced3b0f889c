#include "inputs.h"

#include <algorithm>

#include "errors.h"

namespace graphrunner {
namespace {

// Plain string building: iostreams here crashed on a machine whose libstdc++ differed from the compiler's.
std::string shape_str(c10::IntArrayRef shape) {
  std::string out = "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    out += std::to_string(shape[i]) + (shape.size() == 1 ? "," : (i + 1 < shape.size() ? ", " : ""));
  }
  return out + ")";
}

std::string with_batch(c10::IntArrayRef row, int64_t tokens) {
  std::string out = tokens == 1 ? "(batch" : "(batch * " + std::to_string(tokens);
  for (int64_t d : row) {
    out += ", " + std::to_string(d);
  }
  return out + (row.empty() ? ",)" : ")");
}

std::string dtype_name(c10::ScalarType t) {
  switch (t) {
    case c10::kLong: return "torch.int64";
    case c10::kInt: return "torch.int32";
    case c10::kShort: return "torch.int16";
    case c10::kChar: return "torch.int8";
    case c10::kByte: return "torch.uint8";
    case c10::kBool: return "torch.bool";
    case c10::kFloat: return "torch.float32";
    case c10::kDouble: return "torch.float64";
    case c10::kHalf: return "torch.float16";
    case c10::kBFloat16: return "torch.bfloat16";
    default: return std::string("torch.") + c10::toString(t);
  }
}

std::string join(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) {
    out += (out.empty() ? "'" : ", '") + n + "'";
  }
  return out;
}

}  // namespace

int64_t InputSpec::unit_bytes() const {
  int64_t n = c10::elementSize(dtype) * rows_per_request;
  for (int64_t d : row_shape) {
    n *= d;
  }
  return n;
}

InputChecker::InputChecker(std::vector<InputSpec> specs, const SizeTable& sizes, bool fallback_eager,
                           c10::DeviceIndex device, int64_t tokens_per_request)
    : specs_(std::move(specs)),
      max_size_(sizes.max_size()),
      max_requests_(sizes.max_requests()),
      ragged_(sizes.ragged()),
      fallback_eager_(fallback_eager),
      device_(device),
      tokens_per_request_(tokens_per_request) {
  if (specs_.empty() || specs_.size() > kMaxInputs) {
    throw InputValueError("a runner takes 1 to " + std::to_string(kMaxInputs) + " inputs, got " +
                          std::to_string(specs_.size()));
  }
  bool counts_tokens = false;
  for (size_t i = 0; i < specs_.size(); ++i) {
    const InputSpec& spec = specs_[i];
    const int64_t units = spec.per_token ? max_size_ : max_requests_;
    if (spec.unit_bytes() > kMaxInputBytes / std::max<int64_t>(units, 1)) {
      throw InputValueError("input '" + spec.name + "' has " + std::to_string(spec.unit_bytes()) + " bytes a " +
                            (spec.per_token ? "token" : "request") + ": at " + std::to_string(units) +
                            " rows its static buffer would hold over the " + std::to_string(kMaxInputBytes >> 20) +
                            " MiB a staged input may; capture smaller sizes, or keep this data in a buffer the "
                            "model owns and pass an index into it");
    }
    if ((spec.per_token || spec.split) && !ragged_) {
      throw InputValueError("input '" + spec.name + "': per-token and split inputs are a ragged runner's");
    }
    if (spec.split) {
      if (split_ >= 0 || spec.per_token || !spec.row_shape.empty() ||
          (spec.dtype != c10::kInt && spec.dtype != c10::kLong)) {
        throw InputValueError("input '" + spec.name + "': a ragged runner's split is one per-request int32 or "
                              "int64 input, one value per request");
      }
      split_ = static_cast<int>(i);
    }
    counts_tokens |= spec.per_token;
  }
  if (ragged_ && (split_ < 0 || !counts_tokens)) {
    throw InputValueError("a ragged runner needs a split input and at least one per-token input");
  }
}

int64_t InputChecker::check_one(size_t i, const at::Tensor& t) const {
  const InputSpec& spec = specs_[i];
  if (!t.defined()) {
    throw InputTypeError("input '" + spec.name + "' is an undefined tensor; pass a tensor of dtype " +
                         dtype_name(spec.dtype));
  }
  if (t.scalar_type() != spec.dtype) {
    throw InputTypeError("input '" + spec.name + "' has dtype " + dtype_name(t.scalar_type()) + ", expected " +
                         dtype_name(spec.dtype) + "; convert it with .to(" + dtype_name(spec.dtype) + ")");
  }
  auto sizes = t.sizes();
  c10::IntArrayRef row(spec.row_shape);
  if (sizes.size() != row.size() + 1 || sizes.slice(1) != row) {
    std::string got = sizes.empty() ? "a 0-d tensor" : "per-row shape " + shape_str(sizes.slice(1));
    throw InputValueError("input '" + spec.name + "' has " + got + ", expected per-row shape " + shape_str(row) +
                          "; pass a tensor of shape " + with_batch(row, spec.rows_per_request));
  }
  if (sizes[0] % spec.rows_per_request != 0) {
    throw InputValueError("input '" + spec.name + "' has " + std::to_string(sizes[0]) +
                          " rows, not a multiple of tokens_per_request (" + std::to_string(spec.rows_per_request) +
                          "): it is a per-token input, so every request needs exactly that many rows");
  }
  return sizes[0] / spec.rows_per_request;
}

StepShape InputChecker::check(BorrowedInputs inputs) const {
  return ragged_ ? check_ragged(inputs) : check_uniform(inputs);
}

StepShape InputChecker::check_uniform(BorrowedInputs inputs) const {
  int64_t batch = -1;
  for (size_t i = 0; i < specs_.size(); ++i) {
    int64_t rows = check_one(i, *inputs[i]);
    if (batch < 0) {
      batch = rows;
    } else if (rows != batch) {
      auto count = [](int64_t requests, const InputSpec& s) {
        return std::to_string(requests * s.rows_per_request) + " rows" +
               (s.rows_per_request == 1 ? "" : " (" + std::to_string(requests) + " requests of " +
                                                   std::to_string(s.rows_per_request) + " tokens)");
      };
      throw InputValueError("inputs disagree on the batch size: '" + specs_[0].name + "' has " +
                            count(batch, specs_[0]) + ", '" + specs_[i].name + "' has " + count(rows, specs_[i]) +
                            "; every input needs one row per request (tokens_per_request rows for a per-token input)");
    }
  }
  if (batch == 0) {
    throw InputValueError("batch size 0: every input has 0 rows; skip the step instead of running it");
  }
  check_devices(inputs);
  if (batch > max_size_ && !fallback_eager_) {
    throw InputValueError("batch size " + std::to_string(batch) + " is above max_batch_size " +
                          std::to_string(max_size_) +
                          "; raise max_batch_size (and capture again) or use fallback='eager'");
  }
  return {batch, batch * tokens_per_request_};
}

namespace {

// The split's values (a CPU tensor of int32 or int64): each >= 1, summing to `tokens`; returns the sum.
template <typename T>
int64_t split_sum(const at::Tensor& split, const std::string& name, int64_t tokens) {
  const T* lengths = split.const_data_ptr<T>();
  int64_t sum = 0;
  for (int64_t r = 0; r < split.numel(); ++r) {
    if (lengths[r] < 1 || lengths[r] > tokens) {
      throw InputValueError("input '" + name + "' gives request " + std::to_string(r) + " " +
                            std::to_string(static_cast<int64_t>(lengths[r])) + " tokens; each request of a step has "
                            "1.." + std::to_string(tokens) + " tokens (the per-token inputs' rows): leave requests "
                            "with no tokens out of the step");
    }
    sum += lengths[r];
  }
  return sum;
}

}  // namespace

StepShape InputChecker::check_ragged(BorrowedInputs inputs) const {
  int64_t requests = -1;
  int64_t tokens = -1;
  size_t first_request = 0;
  size_t first_token = 0;
  for (size_t i = 0; i < specs_.size(); ++i) {
    const int64_t rows = check_one(i, *inputs[i]);
    int64_t& count = specs_[i].per_token ? tokens : requests;
    size_t& first = specs_[i].per_token ? first_token : first_request;
    if (count < 0) {
      count = rows;
      first = i;
    } else if (rows != count) {
      const char* what = specs_[i].per_token ? "per-token inputs need one row per token" :
                                               "per-request inputs need one row per request";
      throw InputValueError("inputs disagree: '" + specs_[first].name + "' has " + std::to_string(count) +
                            " rows, '" + specs_[i].name + "' has " + std::to_string(rows) + " rows; " + what);
    }
  }
  if (tokens == 0) {
    throw InputValueError("0 tokens: every per-token input has 0 rows; skip the step instead of running it");
  }
  const InputSpec& split_spec = specs_[split_];
  const at::Tensor& split = *inputs[split_];
  if (!split.device().is_cpu()) {
    throw InputValueError("input '" + split_spec.name + "' (the split) is on " + split.device().str() +
                          "; pass each request's token count as a CPU tensor (the runner checks it on the host and "
                          "stages it to the GPU itself)");
  }
  if (!split.is_contiguous()) {
    throw InputValueError("input '" + split_spec.name + "' (the split) is not contiguous; pass .contiguous()");
  }
  const int64_t sum = split_spec.dtype == c10::kInt ? split_sum<int32_t>(split, split_spec.name, tokens) :
                                                      split_sum<int64_t>(split, split_spec.name, tokens);
  if (sum != tokens) {
    throw InputValueError("input '" + split_spec.name + "' sums to " + std::to_string(sum) + " tokens, but the "
                          "per-token inputs have " + std::to_string(tokens) + " rows ('" + specs_[first_token].name +
                          "'); each request's token count must match its rows in the per-token inputs");
  }
  if ((tokens > max_size_ || requests > max_requests_) && !fallback_eager_) {
    throw InputValueError("a step of " + std::to_string(tokens) + " tokens over " + std::to_string(requests) +
                          " requests is larger than every captured size (at most " + std::to_string(max_size_) +
                          " tokens, " + std::to_string(max_requests_) + " requests); split it into smaller steps, "
                          "capture larger sizes, or use fallback='eager'");
  }
  check_devices(inputs);
  return {requests, tokens};
}

void InputChecker::check_devices(BorrowedInputs inputs) const {
  for (size_t i = 0; i < specs_.size(); ++i) {
    const at::Tensor& t = *inputs[i];
    if (specs_[i].split) {
      continue;
    }
    if (!t.is_cuda() || t.get_device() != device_) {
      throw InputValueError("input '" + specs_[i].name + "' is on " + t.device().str() + ", expected cuda:" +
                            std::to_string(device_) + "; move it with .to('cuda:" + std::to_string(device_) + "')");
    }
  }
}

void InputChecker::throw_name_error(const std::vector<std::string>& given) const {
  std::vector<std::string> missing, extra;
  for (const auto& spec : specs_) {
    if (std::find(given.begin(), given.end(), spec.name) == given.end()) {
      missing.push_back(spec.name);
    }
  }
  for (const auto& name : given) {
    auto same = [&](const InputSpec& s) { return s.name == name; };
    if (std::none_of(specs_.begin(), specs_.end(), same)) {
      extra.push_back(name);
    }
  }
  std::vector<std::string> expected;
  for (const auto& spec : specs_) {
    expected.push_back(spec.name);
  }
  std::string msg;
  if (!missing.empty()) {
    msg += "missing input(s) " + join(missing);
  }
  if (!extra.empty()) {
    msg += (msg.empty() ? "" : "; ") + std::string("unexpected input(s) ") + join(extra);
  }
  throw InputTypeError(msg + "; the runner was built with inputs " + join(expected));
}

}  // namespace graphrunner
