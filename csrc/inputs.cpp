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

int64_t InputSpec::row_bytes() const {
  int64_t n = c10::elementSize(dtype) * tokens;
  for (int64_t d : row_shape) {
    n *= d;
  }
  return n;
}

InputChecker::InputChecker(std::vector<InputSpec> specs, int64_t max_batch_size, bool fallback_eager,
                           c10::DeviceIndex device)
    : specs_(std::move(specs)), max_batch_size_(max_batch_size), fallback_eager_(fallback_eager), device_(device) {
  if (specs_.empty() || specs_.size() > kMaxInputs) {
    throw InputValueError("a runner takes 1 to " + std::to_string(kMaxInputs) + " inputs, got " +
                          std::to_string(specs_.size()));
  }
  for (const InputSpec& spec : specs_) {
    if (spec.row_bytes() > kMaxInputBytes / std::max<int64_t>(max_batch_size_, 1)) {
      throw InputValueError("input '" + spec.name + "' has " + std::to_string(spec.row_bytes()) +
                            " bytes a request: at max_batch_size " + std::to_string(max_batch_size_) +
                            " its static buffer would hold over the " + std::to_string(kMaxInputBytes >> 20) +
                            " MiB a staged input may; lower max_batch_size, or keep this data in a buffer the "
                            "model owns and pass an index into it");
    }
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
                          "; pass a tensor of shape " + with_batch(row, spec.tokens));
  }
  if (sizes[0] % spec.tokens != 0) {
    throw InputValueError("input '" + spec.name + "' has " + std::to_string(sizes[0]) +
                          " rows, not a multiple of tokens_per_request (" + std::to_string(spec.tokens) +
                          "): it is a per-token input, so every request needs exactly that many rows");
  }
  return sizes[0] / spec.tokens;
}

int64_t InputChecker::check(BorrowedInputs inputs) const {
  int64_t batch = -1;
  for (size_t i = 0; i < specs_.size(); ++i) {
    int64_t rows = check_one(i, *inputs[i]);
    if (batch < 0) {
      batch = rows;
    } else if (rows != batch) {
      auto count = [](int64_t requests, const InputSpec& s) {
        return std::to_string(requests * s.tokens) + " rows" +
               (s.tokens == 1 ? "" : " (" + std::to_string(requests) + " requests of " + std::to_string(s.tokens) +
                                         " tokens)");
      };
      throw InputValueError("inputs disagree on the batch size: '" + specs_[0].name + "' has " +
                            count(batch, specs_[0]) + ", '" + specs_[i].name + "' has " + count(rows, specs_[i]) +
                            "; every input needs one row per request (tokens_per_request rows for a per-token input)");
    }
  }
  if (batch == 0) {
    throw InputValueError("batch size 0: every input has 0 rows; skip the step instead of running it");
  }
  for (size_t i = 0; i < specs_.size(); ++i) {
    const at::Tensor& t = *inputs[i];
    if (!t.is_cuda() || t.get_device() != device_) {
      throw InputValueError("input '" + specs_[i].name + "' is on " + t.device().str() + ", expected cuda:" +
                            std::to_string(device_) + "; move it with .to('cuda:" + std::to_string(device_) + "')");
    }
  }
  if (batch > max_batch_size_ && !fallback_eager_) {
    throw InputValueError("batch size " + std::to_string(batch) + " is above max_batch_size " +
                          std::to_string(max_batch_size_) +
                          "; raise max_batch_size (and capture again) or use fallback='eager'");
  }
  return batch;
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
