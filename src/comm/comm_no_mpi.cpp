// A build without MPI (SY_WITH_MPI=OFF, or no MPI found): the MPI backend is absent.
#include "comm/comm.h"
#include "switchyard/error.h"

namespace switchyard::comm {

std::unique_ptr<CommBackend> make_mpi_backend(const MpiCommHandle*, const CommOptions&) {
  detail::throw_error(
      "make_mpi_communicator: this build of switchyard has no MPI backend (configure with "
      "-DSY_WITH_MPI=ON and an MPI installed, e.g. Debian's libopenmpi-dev)");
}

}  // namespace switchyard::comm
