-- busted output handler: gtest-style lines while running, then one closing
-- line "N passed, N failed" (errors count as failed), which CI reads.
return function(options)
  local busted = require 'busted'
  local inner = require 'busted.outputHandlers.gtest'(options)
  local subscribe = inner.subscribe
  inner.subscribe = function(handler, opts)
    subscribe(handler, opts)
    -- subscribed after the gtest handler, so this line comes last
    busted.subscribe({ 'exit' }, function()
      local failed = #inner.failures + #inner.errors
      io.write(string.format('%d passed, %d failed', #inner.successes, failed))
      if #inner.pendings > 0 then io.write(string.format(', %d skipped', #inner.pendings)) end
      io.write('\n')
      io.flush()
      return nil, true
    end)
  end
  return inner
end
