/* A native stack for a process that dies of a signal, for GPU machines without gdb: LD_PRELOAD it and a fatal
 * SIGSEGV, SIGBUS, SIGFPE, SIGILL or SIGABRT prints the C frames (module+offset, and names where exported) to
 * stderr before the process dies as it would have. Python's faulthandler, enabled later (pytest enables it),
 * prints the Python stack first and then re-raises into this handler. It writes to the stderr the process started
 * with (pytest redirects file descriptor 2 while a test runs).
 *   gcc -shared -fPIC -O1 -o build/segv_trace.so benchmarks/segv_trace.c
 *   LD_PRELOAD=$PWD/build/segv_trace.so python3 -m pytest tests */
#include <execinfo.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

static int out_fd = STDERR_FILENO;

static void print_stack(int signum) {
  static const char head[] = "\n== segv_trace: native stack of the fatal signal ==\n";
  void* frames[128];
  const int count = backtrace(frames, 128);
  (void)signum;
  (void)!write(out_fd, head, sizeof(head) - 1);
  backtrace_symbols_fd(frames, count, out_fd);
  signal(signum, SIG_DFL);  /* then die of it, as without this handler */
  raise(signum);
}

__attribute__((constructor)) static void install(void) {
  const int fatal[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT};
  struct sigaction action;
  void* warm[1];
  backtrace(warm, 1);  /* loads the unwinder now: its first call allocates, which a signal handler must not */
  /* close-on-exec: a child process must not keep the caller's pipe open after this process dies */
  const int saved = fcntl(STDERR_FILENO, F_DUPFD_CLOEXEC, 3);
  if (saved >= 0) {
    out_fd = saved;
  }
  memset(&action, 0, sizeof(action));
  action.sa_handler = print_stack;
  action.sa_flags = SA_NODEFER | SA_RESETHAND;
  sigemptyset(&action.sa_mask);
  for (unsigned i = 0; i < sizeof(fatal) / sizeof(fatal[0]); ++i) {
    sigaction(fatal[i], &action, NULL);
  }
}
