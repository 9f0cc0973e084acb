/* An XLA:CPU FFI handler that returns its output buffer as allocated: uninitialised memory.
 *
 * jax.lax.empty lowers to AllocateBuffer on GPU/TPU but to a zero fill on the CPU, where the
 * looped model's S-row loop buffers (asura/model/dynamic_loop.py) then cost in proportion to
 * max_iterations S rather than to the depth n that runs. Rows t >= n are never read.
 *
 * Two calls reach the handler: XLA's metadata query when the target is registered (answered with
 * the FFI API version this was compiled against; registration fails on a mismatch), and each
 * execution, which does nothing.
 */
#include <stddef.h>

#include "xla/ffi/api/c_api.h"

XLA_FFI_Error* asura_uninitialised(XLA_FFI_CallFrame* frame) {
  /* __typeof__: the extension struct's name changed across jaxlib releases; its fields did not. */
  for (__typeof__(frame->extension_start) e = frame->extension_start; e != NULL; e = e->next) {
    if (e->type == XLA_FFI_Extension_Metadata) {
      XLA_FFI_Metadata* metadata = ((XLA_FFI_Metadata_Extension*)e)->metadata;
      metadata->api_version.major_version = XLA_FFI_API_MAJOR;
      metadata->api_version.minor_version = XLA_FFI_API_MINOR;
      metadata->traits = 0; /* stateless, no command-buffer claims */
    }
  }
  return NULL;
}
